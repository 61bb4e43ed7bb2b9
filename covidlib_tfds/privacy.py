"""Pseudonyms for patient identifiers: salted hashes, and checks that nothing else leaks.

    from covidlib_tfds import privacy
    salt = privacy.resolve_salt(flag_value)               # --salt, else $COVIDLIB_SALT
    privacy.pseudonym(salt, 'site_a', 'PID-0042')         # '3f1c...' (16 hex digits)
    privacy.reveals('P0042/IM1.dcm', ['P0042'])           # True: the path names the patient

A patient id is stored as HMAC-SHA256(salt, site + NUL + id), truncated to 64 bits (16 hex
digits): without the salt nobody can test a guessed id against it (a plain hash of a short
hospital number is reversed by trying them all), and the same id at two sites gives two
pseudonyms, since it means two people. The salt is a build argument only: it is never written to
the dataset, its metadata or the logs. Keep it secret, and keep it if later builds must give the
same pseudonyms (e.g. to add data without moving patients between splits).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Iterable

from covidlib import errors

SALT_ENV = 'COVIDLIB_SALT'
MIN_SALT_CHARS = 8
_HEX_DIGITS = 16  # 64 bits: no collision to fear below ~10^8 patients.


def resolve_salt(salt: str | None) -> str:
  """The salt given, else $COVIDLIB_SALT.

  Raises:
    UsageError: neither is set, or the salt is shorter than MIN_SALT_CHARS.
  """
  salt = salt or os.environ.get(SALT_ENV, '')
  if not salt:
    raise errors.UsageError(
        f'a salt is required to pseudonymise patient ids: set ${SALT_ENV} (preferred: a flag '
        'shows in the process list and shell history) or pass --salt; keep it secret')
  if len(salt) < MIN_SALT_CHARS:
    raise errors.UsageError(f'the salt must have at least {MIN_SALT_CHARS} characters, got '
                            f'{len(salt)}')
  return salt


def _hmac(salt: str, message: str) -> str:
  return hmac.new(salt.encode('utf-8'), message.encode('utf-8'),
                  hashlib.sha256).hexdigest()[:_HEX_DIGITS]


def pseudonym(salt: str, site: str, patient_id: str) -> str:
  """The stored patient id: a salted hash of (site, id); '' for an unknown id."""
  if not patient_id:
    return ''
  return _hmac(salt, f'patient\0{site}\0{patient_id}')


def hashed_filename(salt: str, path: str) -> str:
  """A file name that names no one: 'file-<16 hex digits><suffix>' (the suffix kept)."""
  suffix = os.path.splitext(path)[1].lower()
  return f'file-{_hmac(salt, "path" + chr(0) + path)}{suffix}'


def hashed_series(salt: str, site: str, series: str) -> str:
  """A file-name series (splitting.series_key) that names no one: 16 hex digits."""
  return _hmac(salt, f'series\0{site}\0{series}')


def _tokens(text: str) -> list[str]:
  return [t for t in re.split(r'[^0-9a-z]+', text.lower()) if t]


def reveals(path: str, identifiers: Iterable[str]) -> bool:
  """Whether `path` shows one of `identifiers` (a patient id, a name part) in clear.

  An identifier of 3 characters or more counts when it is one of the path's alphanumeric tokens
  ('P0042' in 'P0042/IM1.dcm'), or, from 6 characters on, anywhere in it ('DOE' does not match
  'DOEBLE', 'PID004217' matches 'xPID004217'). Shorter ids ('12') would match by chance.
  """
  lowered = path.lower()
  tokens = set(_tokens(path))
  for identifier in identifiers:
    for part in _tokens(identifier) + [identifier.strip().lower()]:
      if len(part) >= 3 and (part in tokens or (len(part) >= 6 and part in lowered)):
        return True
  return False
