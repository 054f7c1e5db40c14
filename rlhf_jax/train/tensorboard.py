"""TensorBoard scalar event files without TensorFlow (or tensorboardX).

An event file is a TFRecord stream of serialised ``tensorflow.Event`` protos. The two protos needed
for scalars are small enough to encode by hand:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

and each TFRecord is ``uint64 len | uint32 masked_crc32c(len) | data | uint32 masked_crc32c(data)``
with ``masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32)`` over CRC-32C (Castagnoli).
``read_scalars`` parses the files back (CRCs checked); TensorBoard reads them as written.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Iterator, Mapping

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 two's complement, as protobuf does
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field_bytes(field: int, payload: bytes) -> bytes:
  return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v)))
        for tag, v in scalars.items()
    )
    out += _field_bytes(5, summary)
  return out


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class EventFileWriter:
  """Appends scalar summaries to a fresh ``events.out.tfevents.*`` file in ``logdir``."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
    self._f.flush()

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._f.write(_record(_event(time.time(), int(step), scalars=scalars)))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    if not self._f.closed:
      self._f.close()


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  result, shift = 0, 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return result, pos


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield field, wire, value


def read_scalars(path: str) -> list[tuple[int, str, float]]:
  """``(step, tag, value)`` of every scalar in an event file; raises on a corrupt record."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (n,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    body = data[pos + 12:pos + 12 + n]
    (bcrc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
    if hcrc != _masked_crc(header) or bcrc != _masked_crc(body):
      raise ValueError(f"{path}: corrupt record at byte {pos}")
    pos += 16 + n
    step = 0
    for field, _, value in _fields(body):
      if field == 2:
        step = value
      elif field == 5:
        for _, _, val in _fields(value):
          tag, simple = None, None
          for f2, _, v2 in _fields(val):
            if f2 == 1:
              tag = v2.decode()
            elif f2 == 2:
              (simple,) = struct.unpack("<f", v2)
          out.append((step, tag, simple))
  return out
