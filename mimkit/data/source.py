"""Where images come from: a folder searched recursively, a tar archive read in place, or the built-in sample.

A source is only an index (sorted relative names, labels) plus ``read_bytes(i)``; decoding is separate
(:mod:`mimkit.data.decode`) so that a loader can decode in worker processes.
"""
import itertools
import math
import os
import random
import stat
import tarfile
from pathlib import Path

import numpy as np
from ..errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".npy", ".npz")
SAMPLE_DIR = Path(__file__).parent / "sample"
BUILTIN = ("builtin", "builtin:sample")
MAX_GZ_BYTES = 2 * 1024 ** 3  # a compressed tar larger than this is not read into memory


def _is_image(relpath: str) -> bool:
    # hidden files and folders are skipped: macOS '._x.jpg' resource forks, '.ipynb_checkpoints', ...
    return relpath.lower().endswith(IMG_EXTENSIONS) and not any(p.startswith(".") for p in relpath.split("/"))


def name_sort_key(name: str):
    return name.split("/")  # component-wise, so a class folder's files stay together in folder order


class ImageSource:
    """Sorted relative image ``names`` with ``labels`` from the first-level folder (-1 for images in the root)."""

    def __init__(self, root, names):
        self.root = str(root)
        self.names = sorted(names, key=name_sort_key)
        # classes: first-level folders holding images, sorted as torchvision's ImageFolder does
        self.classes = sorted({n.split("/", 1)[0] for n in self.names if "/" in n})
        idx = {c: i for i, c in enumerate(self.classes)}
        self.labels = [idx[n.split("/", 1)[0]] if "/" in n else -1 for n in self.names]

    def __len__(self):
        return len(self.names)

    def read_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def sort_key(self, i: int):
        """Where image ``i`` stands in its class for the fixed split: its position here (sources are in sorted
        order); a source in another order (shuffled shards) gives the key of the file it came from."""
        return i

    def __repr__(self):
        return f"{type(self).__name__}({self.root!r}, {len(self)} images, {len(self.classes)} classes)"


class FolderSource(ImageSource):
    def __init__(self, root):
        names, seen = [], set()
        # follow symlinked folders, but visit every real folder once so that symlink loops terminate;
        # sorted descent makes the choice between two links to one folder deterministic
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            names += [f if rel == "." else f"{rel}/{f}" for f in filenames if _is_image(f)]
        super().__init__(root, names)

    def read_bytes(self, i):
        return read_regular_file(os.path.join(self.root, self.names[i]))


def read_regular_file(path) -> bytes:
    # non-blocking open + fstat: a named pipe or device called *.jpg must fail, not block the loader forever
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        return f.read()


class FileSource(FolderSource):
    """A single image file, unlabeled."""

    def __init__(self, path):
        ImageSource.__init__(self, Path(path).parent, [Path(path).name])


class BytesSource(ImageSource):
    """One image held in memory under its file name (an upload to ``mimkit explore``), unlabeled."""

    def __init__(self, name: str, data: bytes):
        super().__init__("<upload>", [name])
        self.data = data

    def read_bytes(self, i):
        return self.data


class TarSource(ImageSource):
    """A tar archive read without extracting.

    Uncompressed: the index keeps each member's data offset and every process (DataLoader worker) lazily opens
    its own file handle and seeks. Compressed (.tar.gz): random access would decompress from the start each time,
    so all image bytes are read into one in-memory buffer at open time (one buffer, not one bytes object per file,
    so that forked workers share its pages instead of copying them through reference counting).
    If every image sits under one top folder (``tar -czf x.tgz cifar10-train``) that folder is the root.
    """

    def __init__(self, path):
        path = str(path)
        self._fh, self._pid, self._blob = None, None, None
        try:
            with tarfile.open(path, "r:") as tf:  # raises ReadError when the archive is compressed
                members = [(m.name, m.offset_data, m.size) for m in tf if m.isreg() and not m.issparse()]
        except tarfile.ReadError:
            members = self._read_compressed(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read the archive ({e})") from None
        members = [(_strip_dot(n), o, s) for n, o, s in members]
        members = [m for m in members if _is_image(m[0])]
        tops = {n.split("/", 1)[0] for n, _, _ in members}
        if len(tops) == 1 and all("/" in n for n, _, _ in members):
            members = [(n.split("/", 1)[1], o, s) for n, o, s in members]
        super().__init__(path, [n for n, _, _ in members])
        where = {n: (o, s) for n, o, s in members}
        self._offsets = np.array([where[n] for n in self.names], dtype=np.int64).reshape(-1, 2)

    def _read_compressed(self, path):
        size = os.path.getsize(path)
        if size > MAX_GZ_BYTES:
            raise DataError(f"{path}: a compressed tar of {size / 2**30:.1f} GiB is too large to hold in memory and "
                            f"too slow to read at random; extract it (tar -xf) or use an uncompressed .tar")
        blob, members = bytearray(), []
        try:
            with tarfile.open(path, "r|*") as tf:  # one sequential pass
                for m in tf:
                    if m.isreg() and _is_image(_strip_dot(m.name)):
                        members.append((m.name, len(blob), m.size))
                        blob += tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable tar archive ({e})") from None
        self._blob = blob
        return members

    def read_bytes(self, i):
        off, size = (int(v) for v in self._offsets[i])
        if self._blob is not None:
            return bytes(memoryview(self._blob)[off:off + size])
        if self._pid != os.getpid():  # first read in this process (main or a forked worker): open our own handle
            self._fh, self._pid = open(self.root, "rb"), os.getpid()
        self._fh.seek(off)
        return self._fh.read(size)

    def __getstate__(self):  # for spawned workers: file handles do not pickle; reopened lazily
        return {**self.__dict__, "_fh": None, "_pid": None}


class ListSource(ImageSource):
    """Images named in a file list: ``.csv`` rows ``path[,label]`` (a first row ``path,label`` or ``path`` is a
    header) or ``.txt`` lines ``path[ label]`` (split at the last whitespace when a label follows); relative paths
    are relative to the list's folder. Labels are class names (sorted, as folder classes); rows without one are
    unlabeled (-1). Listing every file is the user's choice, so any extension is taken as it is named."""

    def __init__(self, path):
        import csv
        path = Path(path)
        base = path.parent
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read the file list ({e})") from None
        rows = []
        if path.suffix.lower() == ".csv":
            for row in csv.reader(text.splitlines()):
                if row and row[0].strip() and not row[0].lstrip().startswith("#"):
                    rows.append([c.strip() for c in row])
            if rows and rows[0][0].lower() in ("path", "file", "filename", "image"):
                rows = rows[1:]
        else:
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    whole = Path(line) if Path(line).is_absolute() else base / line
                    rows.append([line] if whole.exists() or not any(c.isspace() for c in line)
                                else line.rsplit(None, 1))
        if any(len(r) > 2 for r in rows):
            bad = next(r for r in rows if len(r) > 2)
            raise DataError(f"{path}: a row has {len(bad)} fields ({','.join(bad)}); expected path[,label]")
        paths = [str(Path(r[0]) if Path(r[0]).is_absolute() else base / r[0]) for r in rows]
        labels = [r[1] if len(r) == 2 and r[1] else None for r in rows]
        gone = next((p for p in paths if not os.path.exists(p)), None)
        if gone:
            raise DataError(f"{path}: lists {gone}, which does not exist")
        if len(set(paths)) < len(paths):
            dup = next(p for p in paths if paths.count(p) > 1)
            raise DataError(f"{path}: {dup} is listed more than once")
        order = sorted(range(len(paths)), key=lambda i: paths[i])
        self.paths = [paths[i] for i in order]
        ImageSource.__init__(self, str(path), [])
        self.names = [os.path.relpath(p, base).replace(os.sep, "/") for p in self.paths]
        self.classes = sorted({labels[i] for i in order if labels[i] is not None})
        idx = {c: k for k, c in enumerate(self.classes)}
        self.labels = [idx[labels[i]] if labels[i] is not None else -1 for i in order]

    def read_bytes(self, i):
        return read_regular_file(self.paths[i])


class JoinedSource(ImageSource):
    """Two labeled sources as one, for separate training and validation sets (``--data`` and ``--val-data``):
    indices [0, len(train)) are the first, the rest the second; class names are the first's, and every class of
    the second must be one of them."""

    def __init__(self, train: ImageSource, val: ImageSource):
        self.parts = (train, val)
        ImageSource.__init__(self, f"{train.root} + {val.root}", [])
        missing = sorted(set(val.classes) - set(train.classes))
        if missing:
            raise DataError(f"{val.root}: class {missing[0]!r} is not among the classes of {train.root} "
                            f"({', '.join(train.classes[:5])}{', ...' if len(train.classes) > 5 else ''})")
        self.names = [os.path.join(s.root, n) for s in self.parts for n in s.names]  # whole paths: unambiguous
        self.classes = list(train.classes)
        idx = {c: k for k, c in enumerate(self.classes)}
        self.labels = list(train.labels) + [idx[val.classes[y]] if y >= 0 else -1 for y in val.labels]

    def read_bytes(self, i):
        train = self.parts[0]
        return train.read_bytes(i) if i < len(train) else self.parts[1].read_bytes(i - len(train))

    def __getstate__(self):
        return self.__dict__


def _strip_dot(name):
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


SOURCE_OPENERS = []  # (claims(path) -> bool, open(path, **dataset_options)) of the sources defined in other modules


def register_source(claims, opener):
    """Let ``open_images`` open the paths ``claims`` accepts with ``opener`` (how shards and HF datasets plug in
    without this module importing them)."""
    SOURCE_OPENERS.append((claims, opener))


def open_images(path, **dataset_options) -> ImageSource:
    """A folder of images (recursive), a .tar/.tar.gz/.tgz of one, a .csv/.txt file list (:class:`ListSource`),
    or ``'builtin'`` (the embedded CIFAR-10 sample);
    tar shards (``x-{000000..000127}.tar``: :mod:`.shards`) or a Hugging Face dataset (``hfds:DIR``: :mod:`.hfdata`,
    which takes ``dataset_options``: image_column, label_column, train_split, val_split).

    Labels come from first-level folder names (sorted), or a list's label column; images in the root are -1
    (unlabeled).
    """
    if str(path) in BUILTIN:
        path = SAMPLE_DIR
    for claims, opener in SOURCE_OPENERS:  # tar shards, Hugging Face datasets (registered by mimkit.data)
        if claims(path):
            return opener(str(path), **dataset_options)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.is_dir():
        src = FolderSource(p)
    elif p.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
        src = TarSource(p)
    elif p.suffix.lower() in (".csv", ".txt"):
        src = ListSource(p)
    elif _is_image(p.name):  # one file, e.g. `mimkit reconstruct --data photo.jpg`
        src = FileSource(p)
    else:
        raise DataError(f"{path}: not a folder, a .tar/.tar.gz/.tgz archive of images or a .csv/.txt file list")
    if not len(src):
        raise DataError(f"{path}: no images found (looked recursively for {' '.join(IMG_EXTENSIONS)}, any case)")
    return src


def split_train_val(source: ImageSource, val_fraction: float = 0.1):
    """Fixed split: per class, the last round(n_c * val_fraction) images in sorted order (``source.sort_key``) are
    validation.

    Unlabeled images (-1) form one group, so an unlabeled source gives the last fraction overall.
    Rounding is half-up (45 * 0.1 -> 5). Returns two sorted lists of source indices.
    A source with named splits (a Hugging Face dataset's train and validation) returns those instead.
    """
    if getattr(source, "fixed_split", None):
        return source.fixed_split
    groups = {}
    for i, y in enumerate(source.labels):
        groups.setdefault(y, []).append(i)
    train, val = [], []
    for idx in groups.values():
        idx.sort(key=source.sort_key)  # a no-op for sources in sorted order
        k = math.floor(len(idx) * val_fraction + 0.5)
        train += idx[:len(idx) - k]
        val += idx[len(idx) - k:]
    return sorted(train), sorted(val)


def spread_over_classes(source: ImageSource, indices, seed: int = 0) -> list:
    """``indices`` reordered so that any first few of them spread over the classes: round-robin over the classes
    (in label order), each class's images in a seeded random order. A figure of the first eight then shows eight
    classes (or eight random images of an unlabeled folder), not the first folder's first files."""
    groups = {}
    for i in indices:
        groups.setdefault(source.labels[i], []).append(i)
    rng = random.Random(seed)
    for members in groups.values():
        rng.shuffle(members)
    rounds = itertools.zip_longest(*(groups[y] for y in sorted(groups)))
    return [i for round_ in rounds for i in round_ if i is not None]

