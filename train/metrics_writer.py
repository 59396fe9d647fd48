"""Where metrics go: ``metrics.jsonl``, TensorBoard event files, stdout, and a progress line.

The TensorBoard writer is dependency-free: an event file is a TFRecord stream of ``Event`` protos,
and a scalar ``Event`` is a handful of protobuf fields, so we encode them here (~40 lines) rather
than depend on TensorFlow or tensorboard to *write* logs. ``tensorboard --logdir WORKDIR/tensorboard``
reads them (the tests read them back with tensorboard's own loader when it is installed).
Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import struct
import sys
import time
from typing import Any, Mapping

__all__ = ["EventFileWriter", "MetricsWriter", "ProgressLine"]


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    """Serialized ``tensorflow.Event``: wall_time=1 (double), step=2 (int64), file_version=3,
    summary=5 -> Summary.value=1 -> {tag=1, simple_value=2 (float)}."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step & (2**64 - 1)))
    if file_version is not None:
        msg += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items())
        msg += _length_delimited(5, values)
    return msg


class EventFileWriter:
    """Appends scalar summaries to ``logdir/events.out.tfevents.<time>.<host>``."""

    def __init__(self, logdir: str | os.PathLike):
        path = pathlib.Path(logdir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc32c(header)) + record
                         + struct.pack("<I", _masked_crc32c(record)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if finite:
            self._write(_event(time.time(), step, scalars=finite))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _jsonable(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


class MetricsWriter:
    """One object for every sink: ``write(step, {"train/loss": ...})`` appends a JSON line to
    ``metrics.jsonl``, an event to TensorBoard, and (``echo=True``) a line to stdout."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        self._jsonl = open(workdir / "metrics.jsonl", "a")
        self._events = EventFileWriter(workdir / "tensorboard")

    def write(self, step: int, metrics: Mapping[str, Any], *, echo: bool = False) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._events.scalars(step, {k: v for k, v in row.items() if k != "step"})
        self._events.flush()
        if echo:
            print(format_metrics(step, row), flush=True)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._events.close()


def format_metrics(step: int, metrics: Mapping[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        if k == "step":
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return f"[step {step}] " + " ".join(parts)


class ProgressLine:
    """A one-line progress bar: step, steps/s, examples/s, loss and ETA. Redrawn in place on a
    terminal, printed as plain lines otherwise (logs stay readable)."""

    def __init__(self, total_steps: int, *, enabled: bool = True, stream=sys.stderr):
        self.total, self.enabled, self.stream = total_steps, enabled, stream
        self.tty = enabled and stream.isatty()

    def update(self, step: int, *, steps_per_sec: float, examples_per_sec: float, loss: float) -> None:
        if not self.enabled:
            return
        frac = step / max(self.total, 1)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        line = (f"[{bar}] {step}/{self.total} | {steps_per_sec:.2f} steps/s | {examples_per_sec:.0f} ex/s | "
                f"loss {loss:.4f} | ETA {eta_s}")
        self.stream.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
