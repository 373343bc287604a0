"""Generic image datasets for mining and drawing.

Every dataset here yields ``(tensor_for_model, index)`` items, where ``index``
is the item's position in the dataset (the number that :class:`interp.TopK`
records), and can give back, for the figures, the *un-normalised* image with
exactly the geometry the model saw (after resizing / cropping / padding) and
the file it came from.

Supported sources (see :func:`open_images`):

* a folder of images in ``ImageFolder`` layout (``root/<class>/*.jpg``) or a
  flat folder (``root/*.png``), or any mix: every image below ``root``,
  in sorted relative-path order (the order ``torchvision.datasets.ImageFolder``
  uses);
* a root holding ``train/`` and ``val/`` folders (Imagenette's layout;
  ``split`` picks one);
* a single image file;
* images already in memory (:class:`ArrayImages`, :class:`TensorImages`).

The engine knows nothing of specific models or datasets: the model's
``preprocess`` callable is passed in by the caller, and a dataset stored in
another layout (MNIST's idx files) is read by its own reader into an
:class:`ArrayImages` (the command line does so: ``interp.commands._data``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "IndexedImages",
    "FileImages",
    "ArrayImages",
    "TensorImages",
    "NoImagesFound",
    "open_images",
    "limited",
    "collate_skipping",
    "display_transform",
    "SubsetImages",
    "decodes_files",
    "auto_workers",
    "AUTO_WORKERS_MIN_IMAGES",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _to_float_image(x: object) -> np.ndarray:
    """Turn a tensor / PIL image / array into float32 ``H x W x C`` in [0, 1]."""
    if isinstance(x, Image.Image):
        arr = np.asarray(x, dtype=np.float32) / 255.0
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        t = t.float()
        if t.ndim == 2:
            t = t[None]
        arr = t.permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(x)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        arr = arr.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _default_preprocess(img: Image.Image) -> torch.Tensor:
    """Used when a model comes without a preprocess: [0, 1] float, no resize."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _is_normalize(step: object) -> bool:
    """Whether ``step`` is a torchvision ``Normalize`` (v1 or v2, or a subclass).

    Told by the class's name and module, not ``isinstance``: importing
    torchvision to compare would cost ``import interp`` over a second.
    """
    return any(c.__name__ == "Normalize" and c.__module__.startswith("torchvision.transforms")
               for c in type(step).__mro__)


def display_transform(preprocess: Callable | None) -> Callable | None:
    """The model's preprocess without its normalisation step(s).

    Returns ``None`` when ``preprocess`` is not a torchvision ``Compose`` (or
    has no ``Normalize``), in which case images are shown by rescaling the
    model input to [0, 1] per image (same geometry, approximate colours).
    """
    if preprocess is None:
        return _default_preprocess
    steps = getattr(preprocess, "transforms", None)
    if not isinstance(steps, (list, tuple)):
        return None
    kept = [s for s in steps if not _is_normalize(s)]
    if len(kept) == len(steps):
        return None
    compose_cls = type(preprocess)
    try:
        return compose_cls(kept)
    except TypeError:
        return None


class IndexedImages(torch.utils.data.Dataset):
    """Base class: items are ``(tensor_for_model, index)``.

    Subclasses implement :meth:`_load` (a PIL image or array for item ``i``)
    and may override :meth:`path` / :meth:`describe`.

    Parameters
    ----------
    preprocess:
        The model's transform from a PIL image to its input tensor; ``None``
        means "float in [0, 1], no resize".
    mode:
        PIL mode every image is converted to (``"RGB"``, ``"L"``) or ``None``
        to keep the file's own mode.
    skip_corrupt:
        If true an unreadable image yields ``None`` (dropped by
        :func:`collate_skipping`, with a warning) instead of raising.
    """

    def __init__(self, preprocess: Callable | None = None, mode: str | None = "RGB", skip_corrupt: bool = False):
        self.preprocess = preprocess
        self.mode = mode
        self.skip_corrupt = skip_corrupt
        self._display = display_transform(preprocess)

    # -- to implement -------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def path(self, index: int) -> str | None:
        """File the item came from, or ``None`` for in-memory data."""
        return None

    def describe(self, index: int) -> str:
        """Human-readable name of an item (for errors and the gallery)."""
        return self.path(index) or f"{type(self).__name__}[{index}]"

    # -- shared -------------------------------------------------------------
    def _pil(self, index: int) -> Image.Image:
        img = self._load(index)
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        if self.mode is not None and img.mode != self.mode:
            img = img.convert(self.mode)
        return img

    def _model_input(self, img: Image.Image) -> torch.Tensor:
        fn = self.preprocess or _default_preprocess
        x = fn(img)
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"the model's preprocess returned {type(x).__name__}, not a tensor; "
                "make it end with a ToTensor/ToDtype step"
            )
        return x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        if index < 0 or index >= len(self):
            raise IndexError(index)
        img = self._read(index, skip=self.skip_corrupt)
        return None if img is None else (self._model_input(img), index)

    def _read(self, index: int, skip: bool = False) -> Image.Image | None:
        """The decoded image; an unreadable one is one clear error, or ``None`` with a warning if ``skip``."""
        try:
            return self._pil(index)
        except (OSError, ValueError, SyntaxError) as exc:
            if skip:
                warnings.warn(f"skipping unreadable image {self.describe(index)}: {exc}", stacklevel=3)
                return None
            raise ValueError(
                f"cannot read image {self.describe(index)}: {exc}; remove or replace it "
                "(or pass --skip-corrupt to skip unreadable images with a warning)"
            ) from exc

    def item(self, index: int) -> torch.Tensor:
        """The model-input tensor of dataset item ``index`` (never skipped)."""
        got = IndexedImages.__getitem__(self, index)
        if got is None:
            raise ValueError(f"cannot read image {self.describe(index)}")
        return got[0]

    def raw(self, index: int) -> np.ndarray:
        """The image as the model saw it, before normalisation.

        Returns
        -------
        numpy.ndarray
            float32 ``H x W x C`` in [0, 1], with the same height and width as
            the model input tensor of this item (so receptive-field boxes index
            it directly).
        """
        img = self._pil(index)
        return self._raw_of(img, self._model_input(img))

    def item_and_raw(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        """:meth:`item` and :meth:`raw` of one image, decoded and preprocessed once."""
        if type(self).item is not IndexedImages.item or type(self).raw is not IndexedImages.raw:
            return self.item(index), self.raw(index)  # a subclass with its own access
        img = self._read(index)
        x = self._model_input(img)
        return x, self._raw_of(img, x)

    def _raw_of(self, img: Image.Image, x: torch.Tensor) -> np.ndarray:
        """:meth:`raw` from the decoded image and its model input."""
        h, w = x.shape[-2:]
        if self._display is not None:
            shown = _to_float_image(self._display(img))
            if shown.shape[:2] == (h, w):
                if shown.max() > 2.0:
                    # A float pipeline on the 0..255 scale (TF-style preprocessing that
                    # normalises with mean/std 128 without scaling to [0, 1] first);
                    # an image in [0, 1] overshoots 1 only slightly when resized.
                    shown = shown / 255.0
                return np.clip(shown, 0.0, 1.0)
        # Fallback: same geometry as the model input, rescaled to [0, 1]
        # (used when the preprocess is an opaque callable).
        arr = _to_float_image(x)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)

    def raw_uint8(self, index: int) -> np.ndarray:
        """:meth:`raw` as ``uint8`` ``H x W x C``."""
        return np.round(self.raw(index) * 255.0).astype(np.uint8)

    def subset(self, indices: Sequence[int]) -> "SubsetImages":
        """A view on some items that keeps their original dataset indices."""
        return SubsetImages(self, indices)


class SubsetImages(IndexedImages):
    """Some items of another :class:`IndexedImages`, keeping its indices.

    ``len()`` is the number of chosen items; the ``index`` yielded and accepted
    by :meth:`raw` / :meth:`path` is the parent's index, so a :class:`TopK`
    mined on a subset refers to the full dataset.
    """

    def __init__(self, parent: IndexedImages, indices: Sequence[int]):
        super().__init__(parent.preprocess, parent.mode, parent.skip_corrupt)
        self.parent = parent
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        return self.parent[self.indices[position]]

    def item(self, index: int) -> torch.Tensor:
        return self.parent.item(index)

    def raw(self, index: int) -> np.ndarray:
        return self.parent.raw(index)

    def item_and_raw(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        return self.parent.item_and_raw(index)

    def path(self, index: int) -> str | None:
        return self.parent.path(index)

    def describe(self, index: int) -> str:
        return self.parent.describe(index)


class FileImages(IndexedImages):
    """Images from files, in the given order."""

    def __init__(self, files: Sequence[str | os.PathLike], preprocess: Callable | None = None,
                 mode: str | None = "RGB", skip_corrupt: bool = False):
        super().__init__(preprocess, mode, skip_corrupt)
        self.files = [str(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as img:
            img.load()  # decode now so a truncated file fails here, with its name
            return img.copy() if img.mode != "P" else img.convert("RGBA")

    def path(self, index: int) -> str | None:
        return self.files[index]


class ArrayImages(IndexedImages):
    """Images held in memory: ``uint8`` array ``N x H x W`` or ``N x H x W x C``."""

    def __init__(self, images: np.ndarray | torch.Tensor, preprocess: Callable | None = None,
                 mode: str | None = None, name: str = "images"):
        super().__init__(preprocess, mode, False)
        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.ndim not in (3, 4):
            raise ValueError(f"expected N x H x W (x C) images, got shape {arr.shape}")
        self.images = arr
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int) -> Image.Image:
        a = self.images[index]
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        return Image.fromarray(a)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


class TensorImages(IndexedImages):
    """Images already preprocessed: a float tensor ``N x C x H x W``.

    The un-normalised view (:meth:`raw`) is each image min-max rescaled to
    [0, 1], since the normalisation that was applied is unknown.
    """

    def __init__(self, images: torch.Tensor, name: str = "images"):
        super().__init__(None, None, False)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("expected an N x C x H x W tensor of model inputs")
        self.images = images
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0 or index >= len(self):
            raise IndexError(index)
        return self.images[index], index

    def item(self, index: int) -> torch.Tensor:
        return self.images[index]

    def raw(self, index: int) -> np.ndarray:
        arr = _to_float_image(self.images[index])
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


#: Fewer images than this: no worker process by default (starting one costs more than it hides).
AUTO_WORKERS_MIN_IMAGES = 512


def decodes_files(data: object) -> bool:
    """Whether reading ``data`` decodes image files (a :class:`FileImages`, or a subset of one)."""
    while isinstance(data, SubsetImages):
        data = data.parent
    return isinstance(data, FileImages)


def auto_workers(data: object, num_workers: int | None) -> int:
    """``num_workers``, or where it is ``None`` the default: one decoding process for a large image folder.

    One ``DataLoader`` worker decodes and preprocesses the JPEGs while this
    process runs the model: with two cores that hid the 7 s of decoding in
    the ResNet-18 report over 3,925 Imagenette images
    (``python -m benchmarks.report``). In-memory data and small sets
    (fewer than :data:`AUTO_WORKERS_MIN_IMAGES`) get none, and so does a
    one-core machine.
    """
    if num_workers is not None:
        return int(num_workers)
    try:
        large = len(data) >= AUTO_WORKERS_MIN_IMAGES  # type: ignore[arg-type]
    except TypeError:
        return 0
    return 1 if large and decodes_files(data) and (os.cpu_count() or 1) >= 2 else 0


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``DataLoader`` collate for :class:`IndexedImages`: drops ``None`` items.

    Returns ``None`` for a batch whose items were all skipped. Raises a clear
    error when images of different sizes meet in one batch.
    """
    items = [b for b in batch if b is not None]
    if not items:
        return None
    shapes = {tuple(x.shape) for x, _ in items}
    if len(shapes) > 1:
        raise ValueError(
            f"images in one batch have different sizes {sorted(shapes)}; give the model a "
            "preprocess that resizes them to one size (or --size N on the command line)"
        )
    xs = torch.stack([x for x, _ in items])
    idx = torch.tensor([int(i) for _, i in items], dtype=torch.long)
    return xs, idx


def _list_images(root: Path) -> list[Path]:
    files = [
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        # Hidden files/folders (.ipynb_checkpoints, macOS "._x.jpg") are not data.
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    # Sorted by path components: the class-then-file order of ImageFolder.
    files.sort(key=lambda p: p.relative_to(root).parts)
    return files


class NoImagesFound(FileNotFoundError):
    """:func:`open_images` found no image file in a folder (``root``: the folder it looked in)."""

    def __init__(self, root: Path) -> None:
        super().__init__(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} in the folder "
                         "and its subfolders)")
        self.root = root


def open_images(
    path: str | os.PathLike,
    preprocess: Callable | None = None,
    *,
    split: str | None = None,
    mode: str | None = "RGB",
    skip_corrupt: bool = False,
    limit: int | None = None,
) -> IndexedImages:
    """Open a dataset of images from ``path``.

    Parameters
    ----------
    path:
        An image folder (ImageFolder layout or flat), a root holding
        ``train/`` and ``val/`` folders (Imagenette), or one image file.
    preprocess:
        The model's input transform (PIL image -> tensor).
    split:
        For a ``train/`` + ``val/`` root: the folder to read (default
        ``"val"``, the held-out split); for another folder, a subfolder of
        that name if there is one.
    mode:
        PIL mode images are converted to (``"RGB"`` for 3-channel models,
        ``"L"`` for 1-channel ones).
    skip_corrupt:
        Skip unreadable images with a warning instead of raising.
    limit:
        Use only ``limit`` items (see :func:`limited`).

    Returns
    -------
    IndexedImages

    Raises
    ------
    FileNotFoundError
        For a missing path; :class:`NoImagesFound` for a folder without images.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    if root.is_dir():
        subdirs = {p.name for p in root.iterdir() if p.is_dir()}
        if {"train", "val"} <= subdirs:
            chosen = split or "val"
            if chosen not in subdirs:
                raise ValueError(f"{root} has no {chosen!r} split; choose one of {sorted(subdirs)}")
            root = root / chosen
        elif split is not None and split in subdirs:
            root = root / split
        files = _list_images(root)
        if not files:
            raise NoImagesFound(root)
    elif root.suffix.lower() in IMAGE_EXTENSIONS:
        files = [root]
    else:
        raise ValueError(f"{root} is neither a folder of images nor an image file")
    return limited(FileImages(files, preprocess, mode=mode, skip_corrupt=skip_corrupt), limit)


def limited(ds: IndexedImages, limit: int | None) -> IndexedImages:
    """``limit`` items of ``ds`` spread evenly over it (so an ImageFolder sample covers every class).

    Indices stay those of the full dataset (:class:`SubsetImages`); ``None``
    or a limit of at least ``len(ds)``: ``ds`` itself.
    """
    if limit is not None and limit < len(ds):
        if limit <= 0:
            raise ValueError(f"--limit must be positive, got {limit}")
        picks = np.unique(np.linspace(0, len(ds) - 1, limit).round().astype(int))
        return ds.subset(picks.tolist())
    return ds
