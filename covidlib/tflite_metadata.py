"""What covidlib stores inside a .tflite file, and how to read it back without TensorFlow.

    from covidlib import tflite_metadata
    content = open('model_int8.tflite', 'rb').read()
    info = tflite_metadata.read_model_info(content)
    info.labels        # ('normal', 'covid'): index = label
    info.decision      # Decision(threshold=..., temperature=..., policy=..., split=...)
    info.input         # {'kind': 'uint8_image', ...} for the any-size variant, else None

    python -m covidlib.tflite_metadata model_uint8_image.tflite     # the same, as JSON

This module is the one definition of the format: `exporters.tflite` writes it, and both
`covidlib.predict` and the TensorFlow-free edge route (`covidlib.edge`) read it. Reading needs
the Python standard library only (the flatbuffer is walked with `struct`), so an app, a script
or a test can read a model's operating point with nothing installed; writing needs
ai-edge-litert's flatbuffer tools, never TensorFlow.

The entries sit in the flatbuffer's `metadata` table (the same mechanism the converter uses for
its own `min_runtime_version` and `CONVERSION_METADATA`): a name and a buffer of bytes each.

  covidlib_labels    labels.txt, UTF-8: 'normal\\ncovid\\n' (line index = label).
  covidlib_decision  decision.json, UTF-8 JSON: {"threshold", "temperature", "policy", "split",
                     "temperature_applied": true}: label = probability >= threshold; the
                     temperature is already folded into the model's weights (do not apply it
                     again).
  covidlib_input     (only in variants whose input is not the preprocessed float tensor) JSON
                     describing the input tensor, e.g. {"kind": "uint8_image", "dtype": "uint8",
                     "shape": [1, -1, -1, 1], "image_size": 224, "channels": 1, ...}.

Any other `covidlib_*` entry holding JSON (say a future shift score) is returned in
`ModelInfo.extra`, by name without the prefix, so readers need no change to see it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys

import numpy as np

from covidlib import errors
from covidlib import model_dir as model_dir_lib

PREFIX = 'covidlib_'
LABELS = 'covidlib_labels'
DECISION = 'covidlib_decision'
INPUT = 'covidlib_input'
SHIFT = 'covidlib_shift'  # shift.json of covidlib.shift: the out-of-distribution threshold.
CLASS_NAMES = ('normal', 'covid')  # = covidlib.CLASS_NAMES; label 1 = COVID-19.

# Field indices of the TFLite schema (tensorflow/compiler/mlir/lite/schema/schema.fbs).
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6
_METADATA_NAME, _METADATA_BUFFER = 0, 1
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a covidlib .tflite says about itself; each field None when the entry is absent."""
  labels: tuple[str, ...] | None
  decision: model_dir_lib.Decision | None
  input: dict | None
  extra: dict[str, object]


def labels_text(class_names=CLASS_NAMES) -> str:
  """labels.txt: one class name per line, line index = label."""
  return ''.join(f'{name}\n' for name in class_names)


def decision_json(decision: model_dir_lib.Decision) -> str:
  """decision.json as exported: the model_dir's fields plus temperature_applied = true."""
  data = dataclasses.asdict(decision)
  data['temperature_applied'] = True
  return json.dumps(data, indent=2, sort_keys=True) + '\n'


def parse_decision(raw: bytes | str) -> model_dir_lib.Decision:
  """decision.json bytes -> Decision; ValueError/KeyError/TypeError when malformed."""
  data = json.loads(raw)
  return model_dir_lib.Decision(threshold=float(data['threshold']), policy=str(data['policy']),
                                temperature=float(data.get('temperature', 1.0)),
                                split=str(data.get('split', '')))


# ------------------------------------------------------------------ Reading (standard library).

class _Reader:
  """Just enough of a flatbuffer reader for tables, vectors, strings and scalars."""

  def __init__(self, data: bytes):
    self.data = memoryview(data)

  def u8(self, pos): return self.data[pos]
  def u16(self, pos): return struct.unpack_from('<H', self.data, pos)[0]
  def i32(self, pos): return struct.unpack_from('<i', self.data, pos)[0]
  def u32(self, pos): return struct.unpack_from('<I', self.data, pos)[0]
  def u64(self, pos): return struct.unpack_from('<Q', self.data, pos)[0]

  def field(self, table: int, index: int) -> int | None:
    """Absolute position of field `index` of the table at `table`, or None if absent."""
    vtable = table - self.i32(table)
    entry = 4 + 2 * index
    if entry >= self.u16(vtable):
      return None
    offset = self.u16(vtable + entry)
    return table + offset if offset else None

  def deref(self, pos: int) -> int:
    return pos + self.u32(pos)

  def vector(self, pos: int) -> tuple[int, int]:
    """(start of elements, length) of the vector referenced at `pos`."""
    start = self.deref(pos)
    return start + 4, self.u32(start)

  def tables(self, table: int, index: int) -> list[int]:
    pos = self.field(table, index)
    if pos is None:
      return []
    start, length = self.vector(pos)
    return [self.deref(start + 4 * i) for i in range(length)]

  def string(self, pos: int) -> bytes:
    start, length = self.vector(pos)
    return bytes(self.data[start:start + length])


def read_metadata(flatbuffer: bytes) -> dict[str, bytes]:
  """Every entry of a .tflite flatbuffer's `metadata` table, by name (e.g. LABELS).

  Raises:
    ModelLoadError: for bytes that are not a readable TFLite flatbuffer.
  """
  flatbuffer = bytes(flatbuffer)
  try:
    if len(flatbuffer) < 8 or flatbuffer[4:8] != b'TFL3':
      raise ValueError('no TFL3 identifier at byte 4')
    reader = _Reader(flatbuffer)
    model = reader.deref(0)
    buffers = reader.tables(model, _MODEL_BUFFERS)
    entries = {}
    for entry in reader.tables(model, _MODEL_METADATA):
      name_pos = reader.field(entry, _METADATA_NAME)
      buffer_pos = reader.field(entry, _METADATA_BUFFER)
      name = reader.string(name_pos).decode() if name_pos is not None else ''
      buffer = buffers[reader.u32(buffer_pos) if buffer_pos is not None else 0]
      offset_pos = reader.field(buffer, _BUFFER_OFFSET)
      offset = reader.u64(offset_pos) if offset_pos is not None else 0
      if offset > 1:  # Models over 2 GB keep buffers after the flatbuffer, by offset.
        size_pos = reader.field(buffer, _BUFFER_SIZE)
        size = reader.u64(size_pos) if size_pos is not None else 0
        if offset + size > len(flatbuffer):
          raise ValueError(f'metadata {name!r} points past the end of the file')
        data = flatbuffer[offset:offset + size]
      else:
        data_pos = reader.field(buffer, _BUFFER_DATA)
        data = reader.string(data_pos) if data_pos is not None else b''
      entries[name] = data
    return entries
  except (ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
    raise errors.ModelLoadError(f'not a readable TFLite flatbuffer ({type(e).__name__}: {e})') \
        from None


def read_decision(flatbuffer: bytes) -> model_dir_lib.Decision | None:
  """The embedded operating point, or None if the file has none."""
  raw = read_metadata(flatbuffer).get(DECISION)
  return None if raw is None else parse_decision(raw)


def read_model_info(flatbuffer: bytes) -> ModelInfo:
  """Labels, decision, input description and other covidlib entries of a .tflite file.

  Raises:
    ModelLoadError: not a TFLite flatbuffer, or a covidlib entry that is not what it should be.
  """
  entries = read_metadata(flatbuffer)
  try:
    labels = decision = model_input = None
    if LABELS in entries:
      labels = tuple(entries[LABELS].decode('utf-8').splitlines())
    if DECISION in entries:
      decision = parse_decision(entries[DECISION])
    if INPUT in entries:
      model_input = json.loads(entries[INPUT])
    extra = {name[len(PREFIX):]: json.loads(data) for name, data in entries.items()
             if name.startswith(PREFIX) and name not in (LABELS, DECISION, INPUT)}
  except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError.
    raise errors.ModelLoadError(f'malformed covidlib metadata in the TFLite file ({e})') from None
  return ModelInfo(labels=labels, decision=decision, input=model_input, extra=extra)


# ------------------------------------------------------------------ Writing (ai-edge-litert).

def embed_metadata(flatbuffer: bytes, entries: dict[str, bytes]) -> bytes:
  """Adds (or replaces) named entries of a .tflite flatbuffer's `metadata` table."""
  from ai_edge_litert import schema_py_generated as schema  # Optional (covidlib[litert]).
  from ai_edge_litert.tools import flatbuffer_utils  # Optional, as above.

  model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
  model.metadata = [m for m in (model.metadata or []) if m.name.decode() not in entries]
  for name, data in entries.items():
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name.encode()
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def covidlib_entries(decision: model_dir_lib.Decision, model_input: dict | None = None,
                     class_names=CLASS_NAMES) -> dict[str, bytes]:
  """The entries `exporters.tflite` embeds in every variant (class_names: label 0, label 1)."""
  entries = {LABELS: labels_text(class_names).encode(), DECISION: decision_json(decision).encode()}
  if model_input is not None:
    entries[INPUT] = (json.dumps(model_input, indent=2, sort_keys=True) + '\n').encode()
  return entries


def main(argv: list[str]) -> int:
  """`python -m covidlib.tflite_metadata MODEL.tflite`: the covidlib entries as one JSON document."""
  if len(argv) != 2:
    print('usage: python -m covidlib.tflite_metadata MODEL.tflite', file=sys.stderr)
    return 2
  try:
    with open(argv[1], 'rb') as f:
      info = read_model_info(f.read())
  except OSError as e:
    print(f'covidlib.tflite_metadata: error: {argv[1]}: {e.strerror}', file=sys.stderr)
    return 2
  except errors.CovidlibError as e:
    print(f'covidlib.tflite_metadata: error: {argv[1]}: {e}', file=sys.stderr)
    return 1
  document = {'labels': info.labels, 'input': info.input, **info.extra,
              'decision': None if info.decision is None else dataclasses.asdict(info.decision)}
  print(json.dumps(document, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))


def read_shift_threshold(flatbuffer: bytes) -> float | None:
  """The embedded shift threshold (the covidlib_shift entry), or None if the file has none."""
  raw = read_metadata(flatbuffer).get(SHIFT)
  if raw is None:
    return None
  threshold = json.loads(raw).get('threshold')
  return None if threshold is None else float(threshold)
