"""ONNX models on disk, past protobuf's 2 GB limit (issue 19).

A ``ModelProto`` serializes to at most 2 GiB: the float graph of a 0.5B model in float32 is about
2 GB, a 1.5B one about 7 GB. Past ``EXTERNAL_THRESHOLD`` bytes of tensors, ``save_onnx`` writes the
model as ONNX external data: the graph in ``<name>.onnx`` and every tensor of at least
``EXTERNAL_MIN_TENSOR`` bytes in one ``<name>.onnx.data`` beside it (page-aligned, so ONNX Runtime
can map it). Below it the model stays one file, as before. ``load_onnx`` reads either form to the
same ``ModelProto``, bit for bit (tests/test_onnxfile.py), and ``onnx_files`` lists the files a
model is made of (to link, copy or remove them together).

Writing is atomic per file (temporary file, fsync, rename): the data file first, then the graph,
so a reader that opens the graph finds the data it names; a crash between the two renames leaves
the old graph beside the new data, which is why callers write a model into a directory that only
becomes visible when complete (``simulation.prepare``, ``client.device``).

onnx and numpy only: a phone uses it too.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto

from quant.qparams import atomic_write_bytes, atomic_write_with

PROTOBUF_LIMIT = 2**31 - 1              # bytes: protobuf cannot serialize a larger message
EXTERNAL_THRESHOLD = 1 << 30            # tensor bytes past which a model goes to external data
EXTERNAL_MIN_TENSOR = 1024              # smaller tensors stay in the graph file (as onnx's own rule)
ALIGN = 4096                            # offsets on page boundaries: ONNX Runtime may mmap them


def data_file(path) -> Path:
    """``model.onnx`` -> ``model.onnx.data``: where ``save_onnx`` puts the external tensors."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def _tensors(mp: onnx.ModelProto):
    """Every initializer of the model (main graph and subgraphs)."""
    yield from mp.graph.initializer
    for node in mp.graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from g.initializer


def tensor_bytes(mp: onnx.ModelProto) -> int:
    """Bytes of the model's initializers held in memory (``raw_data`` and typed fields)."""
    return sum(t.ByteSize() for t in _tensors(mp))


def external_bytes(mp: onnx.ModelProto) -> int:
    """Bytes of the model's tensors that live in data files (their ``length`` entries)."""
    return sum(int(e.value) for t in _tensors(mp) if is_external(t) for e in t.external_data if e.key == "length")


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def has_external_data(mp: onnx.ModelProto) -> bool:
    """Whether some tensor of ``mp`` lives in a data file (a graph loaded without its data)."""
    return any(is_external(t) for t in _tensors(mp))


def save_onnx(mp: onnx.ModelProto, path, *, external_threshold: int = EXTERNAL_THRESHOLD) -> Path:
    """Write ``mp`` to ``path`` atomically: one file when its tensors take at most
    ``external_threshold`` bytes, else the graph plus ``data_file(path)`` (module docstring).

    ``mp`` is not changed, and the extra memory is one tensor, not the model: the data file is
    written from ``mp``'s initializers one at a time, the graph file from a copy of ``mp`` whose
    large initializers only name their place in it. (Moving each tensor's bytes out of ``mp`` and
    back, as this did before, cost the model's size again: protobuf does not reuse the memory a
    cleared field held, which killed a 1.5B export.) Initializers of subgraphs stay in the graph
    file. A stale data file of an earlier, larger write is removed when the model now fits in
    one file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data_file(path)
    if has_external_data(mp):
        raise ValueError(f"{path}: the model holds tensors whose data was not loaded "
                         "(load it with load_onnx before saving it elsewhere)")
    if tensor_bytes(mp) <= external_threshold:
        atomic_write_bytes(path, mp.SerializeToString())
        data.unlink(missing_ok=True)
        return path

    graph = onnx.ModelProto()
    copy_fields(mp, graph, skip=("graph",))
    copy_fields(mp.graph, graph.graph, skip=("initializer",))

    def write_data(f) -> None:
        offset = 0
        for t in mp.graph.initializer:
            ref = graph.graph.initializer.add()
            if not t.HasField("raw_data") or t.ByteSize() < EXTERNAL_MIN_TENSOR:
                ref.CopyFrom(t)
                continue
            raw = t.raw_data
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            copy_fields(t, ref, skip=("raw_data",))
            ref.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                ref.external_data.add(key=k, value=v)
            offset += len(raw)
            del raw

    atomic_write_with(data, write_data)
    blob = graph.SerializeToString()
    if len(blob) > PROTOBUF_LIMIT:
        raise ValueError(f"{path}: the graph alone is {len(blob)} bytes, past protobuf's limit")
    atomic_write_bytes(path, blob)
    return path


def copy_fields(src, dst, skip=()) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` but those named in ``skip``
    (a model without its weights, to add them one at a time)."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def compact(mp: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``mp`` without the memory of replaced tensors: protobuf keeps what a ``CopyFrom``
    or a deletion replaced in the message's arena until the whole message is freed (measured: 100
    MB more per patch of a 100 MB tensor). Replace the model by this after patching it."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(mp)
    return fresh


def load_onnx(path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """The model at ``path``, one file or with external data, as one in-memory ``ModelProto``
    that is the same, bit for bit, whichever form it was saved in. ``load_external_data=False``
    gives the graph with external tensors left on disk (``external_dir(path)`` resolves them):
    what a session needs, without the weights in Python's memory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX model")
    try:
        mp = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if load_external_data and has_external_data(mp):
        load_external(mp, path.parent)
    return mp


def load_external(mp: onnx.ModelProto, base, only=None) -> None:
    """Read the tensors of ``mp`` still on disk (their locations relative to ``base``) into it,
    exactly as a one-file load holds them; ``only(name)`` chooses which (default all). Our own
    reader, not onnx's: onnx refuses a data file with several hard links, and a run directory
    shares its float graph by hard links (a data file must lie in ``base`` itself)."""
    base = Path(base)
    handles: dict[str, object] = {}
    try:
        for t in _tensors(mp):
            if not is_external(t) or (only is not None and not only(t.name)):
                continue
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            if not loc or Path(loc).name != loc or loc in (".", ".."):
                raise ValueError(f"tensor {t.name}: external data location {loc!r} is not a file "
                                 f"name in the model's directory {base}")
            if loc not in handles:
                if not (base / loc).is_file():
                    raise FileNotFoundError(f"{base / loc}: external data of tensor {t.name} is missing")
                handles[loc] = open(base / loc, "rb")
            f = handles[loc]
            f.seek(int(info.get("offset", 0)))
            length = int(info["length"]) if "length" in info else -1
            raw = f.read(length)
            if length >= 0 and len(raw) != length:
                raise ValueError(f"{base / loc}: tensor {t.name} needs {length} bytes at offset "
                                 f"{info.get('offset', 0)}, the file is shorter (truncated?)")
            t.raw_data = raw
            del t.external_data[:]
            t.ClearField("data_location")
    finally:
        for f in handles.values():
            f.close()


def external_locations(mp: onnx.ModelProto) -> list[str]:
    """The data files (relative to the model's directory) that ``mp``'s external tensors name."""
    out = []
    for t in _tensors(mp):
        if is_external(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc is None:
                raise ValueError(f"tensor {t.name}: external data without a location")
            if loc not in out:
                out.append(loc)
    return out


def onnx_files(path) -> list[Path]:
    """The files model ``path`` is made of: the graph, then the data files its tensors name."""
    path = Path(path)
    mp = onnx.load(str(path), load_external_data=False)
    return [path] + [path.parent / loc for loc in external_locations(mp)]


def link_file(src, dst) -> Path:
    """``dst`` becomes the file ``src`` atomically: a hard link (stored once), or a copy across
    filesystems."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def link_onnx(src, dst) -> Path:
    """Make model ``dst`` the same files as ``src`` (graph and data), each by ``link_file``. The
    data first, the graph last (see the module docstring); a data file keeps its name, the one
    the graph refers to."""
    src, dst = Path(src), Path(dst)
    files = onnx_files(src)
    for f in files[1:] + files[:1]:
        if f.parent != src.parent:
            raise ValueError(f"{src}: external data {f} outside the model's directory")
        link_file(f, dst.parent / (dst.name if f == src else f.name))
    return dst
