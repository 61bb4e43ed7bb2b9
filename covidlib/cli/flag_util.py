"""Flag definitions that several covidlib binaries can share within one process.

absl keeps one flag per name per process and raises DuplicateFlagError when a second module
defines `--model_dir` again. Each binary runs in its own process, so that never happens in use;
it does in a test process that imports two binaries (say covidlib-evaluate and
covidlib-crossval). `define` returns the existing flag in that case, so the first definition's
default and help stand; tests set every flag they rely on explicitly. A flag it defines allows
override, so a binary that calls plain `flags.DEFINE_*` for the same name later in the same
process replaces it instead of failing with DuplicateFlagError (holders read flags by name, so
every binary then sees that one flag). absl counts a flag defined here as the calling binary's
(`disclaim_key_flags`), so --helpfull lists it under that binary.

    from covidlib.cli import flag_util
    _MODEL_DIR = flag_util.define(flags.DEFINE_string, 'model_dir', None, 'A run.', required=True)
"""

from __future__ import annotations

from typing import Any, Callable

from absl import flags

flags.disclaim_key_flags()  # Flags defined through `define` belong to its caller.


def define(definer: Callable[..., flags.FlagHolder], name: str, default: Any, help_text: str,
           **kwargs: Any) -> flags.FlagHolder:
  """`definer(name, default, help_text, **kwargs)`, or a holder of the flag already defined."""
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return definer(name, default, help_text, allow_override=True, **kwargs)
