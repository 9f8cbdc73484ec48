"""Face alignment and paste-back, as upstream's ``AlignRestore`` does it.

Three anchors (eyebrow centres and nose centre, see ``latentsync.face``) are mapped by a similarity transform onto
a fixed template; the frame is warped into a 75:100 (w:h) crop and stretched to R×R with Lanczos — the model was
trained on that non-uniform stretch. After generation the face goes back the inverse way and is blended in with an
eroded, Gaussian-feathered copy of the warped crop rectangle.

The warps are torch ``grid_sample`` calls equal to kornia's ``warp_affine`` (bilinear, ``align_corners=True``,
fill 127), so they run on whatever device the tensors are on. Only a window of the frame around the face is
touched: outside it upstream's blend weight is exactly zero, so the frame's pixels come back unchanged.
Upstream runs matrices and warps in fp16 on CUDA; we keep float32 everywhere (its CPU path, and the fixtures).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from latentsync.devices import Staging, pick_rows
from latentsync.errors import InputError

# Upstream's template, in units of a 256-px model's crop divided by 2.8; everything else derives from resolution.
_TEMPLATE_UNITS = ((17.0, 20.0), (58.0, 20.0), (37.5, 40.0))  # left eyebrow, right eyebrow, nose
_CROP_UNITS_WH = (75, 100)
_FILL = 127.0  # grey that upstream's warps write where the source is outside the image
_SMOOTH_KEEP = 0.2  # weight of the previous frame's bias in upstream's p_bias smoothing
# Largest |bias| per coordinate: the bias is a difference of two points normalised by the std of their three
# centred points' six coordinates, each at most √5 of that std. Smoothing keeps the state within it too (a mean
# of biases); the margin covers rounding.
BIAS_BOUND = 2 * math.sqrt(5) + 0.03


def face_geometry(resolution: int) -> tuple[tuple[int, int], np.ndarray]:
    """Crop size (w, h) and the (3, 2) template for a model resolution, derived as upstream does."""
    ratio = resolution / 256 * 2.8
    size = (int(_CROP_UNITS_WH[0] * ratio), int(_CROP_UNITS_WH[1] * ratio))
    return size, np.array(_TEMPLATE_UNITS, dtype=np.float64) * ratio


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Procrustes) mapping ``src`` points onto ``dst``, as upstream computes it.

    Returns the 2×3 matrix and upstream's "bias": the nose point's residual in normalised units (before rotation),
    which upstream adds to the matrix's translation — a quirk kept because the model was trained with it.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    c1, c2 = src.mean(0), dst.mean(0)
    a, b = src - c1, dst - c2
    s1, s2 = a.std(ddof=1), b.std(ddof=1)  # torch.std over all six numbers: unbiased
    a, b = a / s1, b / s2
    u, _, vt = np.linalg.svd(a.T @ b)
    v = vt.T
    rot = v @ u.T
    if np.linalg.det(rot) < 0:
        v[:, -1] *= -1
        rot = v @ u.T
    scale_rot = (s2 / s1) * rot
    matrix = np.hstack([scale_rot, (c2 - scale_rot @ c1)[:, None]])
    return matrix, b[2] - a[2]


def _chw_float(window: torch.Tensor) -> torch.Tensor:
    """An (h, w, 3) uint8 window (on its device) as a float32 (1, 3, h, w) tensor: windows go up as uint8 (a
    quarter of float32's bytes) and are converted there."""
    return window.to(torch.float32).permute(2, 0, 1).unsqueeze(0)


def _upload_windows(frames: list[np.ndarray | torch.Tensor], bounds: Sequence[tuple[int, int, int, int] | None],
                    matrices: list[np.ndarray], device: torch.device, staging: Staging
                    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """The frames' windows (rows r0:r1, columns c0:c1; None: no window) as float32 (1, 3, h, w) tensors on
    ``device``, and the (2, 3) matrices as float32 tensors there: the host frames' windows and the matrices go up
    in one copy per batch (each small copy would be a transfer and a wait of its own)."""
    host: list[int] = []
    arrays: list[np.ndarray] = []
    for k, (frame, b) in enumerate(zip(frames, bounds, strict=True)):
        if b is not None and isinstance(frame, np.ndarray):
            host.append(k)
            arrays.append(frame[b[0]:b[1], b[2]:b[3]])
    *up, stacked = staging.upload([*arrays, np.stack(matrices).astype(np.float32)])
    windows: list[torch.Tensor | None] = [None] * len(frames)
    for k, window in zip(host, up, strict=True):
        windows[k] = _chw_float(window)
    for k, (frame, b) in enumerate(zip(frames, bounds, strict=True)):
        if b is not None and isinstance(frame, torch.Tensor):  # already on its device
            windows[k] = _chw_float(frame[b[0]:b[1], b[2]:b[3]].to(device))
    return windows, list(stacked)


def _sample_grid(matrix: torch.Tensor, out_rows: torch.Tensor, out_cols: torch.Tensor, src_hw: tuple[int, int],
                 src_origin: tuple[int, int]) -> torch.Tensor:
    """grid_sample grid (align_corners=True) that reads source pixel ``matrix @ (x, y, 1)`` for output pixel (x, y).

    ``src_origin`` (row, col) is where the source window starts in the coordinates ``matrix`` maps into.
    """
    ys, xs = torch.meshgrid(out_rows, out_cols, indexing="ij")
    sx = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2] - src_origin[1]
    sy = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2] - src_origin[0]
    h, w = src_hw
    # align_corners=True: -1 and +1 are the centres of the first and last pixels.
    gx = sx * (2.0 / max(w - 1, 1)) - 1.0
    gy = sy * (2.0 / max(h - 1, 1)) - 1.0
    return torch.stack([gx, gy], dim=-1).unsqueeze(0)


def _warp(src: torch.Tensor, grid: torch.Tensor, fill: float | None) -> torch.Tensor:
    """Bilinear warp; with ``fill`` the outside is blended towards that value as kornia's padding_mode="fill" does."""
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if fill is not None:
        ones = torch.ones_like(src[:, :1])
        coverage = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out + (1.0 - coverage) * fill
    return out


def _erode(mask: torch.Tensor, size: int, anchor: int) -> torch.Tensor:
    """Min filter of a (1, 1, h, w) mask over a ``size``² window starting ``anchor`` pixels above/left of each
    pixel; the image border never erodes (OpenCV's and kornia's default). OpenCV on the CPU, torch elsewhere."""
    if size <= 1:
        return mask
    if mask.device.type != "cpu":
        return _erode_torch(mask, size, anchor)
    kernel = np.ones((size, size), np.uint8)
    eroded = cv2.erode(mask[0, 0].numpy(), kernel, anchor=(anchor, anchor), borderType=cv2.BORDER_CONSTANT,
                       borderValue=(math.inf,))
    return torch.from_numpy(eroded)[None, None]


def _erode_torch(mask: torch.Tensor, size: int, anchor: int) -> torch.Tensor:
    """``_erode`` as two 1-D max-pools (a rectangle's minimum is the minimum of its rows' minima)."""
    lead, trail = anchor, size - 1 - anchor
    out = F.max_pool2d(F.pad(-mask, (lead, trail, 0, 0), value=-math.inf), (1, size), stride=1)
    out = F.max_pool2d(F.pad(out, (0, 0, lead, trail), value=-math.inf), (size, 1), stride=1)
    return -out


def _gaussian_blur(mask: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect borders (kornia's ``gaussian_blur2d``).

    On the CPU two 1-D convolutions, as always. On a GPU each pass is a product with a banded matrix that holds
    the kernel and the reflection: a convolution there would make cuDNN plan again for every window shape and
    kernel width (every face size), a matrix product needs no plan.
    """
    if size <= 1:
        return mask
    x = torch.arange(size, dtype=torch.float32, device=mask.device) - size // 2
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()
    r = size // 2
    if mask.device.type == "cuda":
        h, w = mask.shape[-2:]
        return _blur_matrix(kernel, h) @ mask @ _blur_matrix(kernel, w).T
    out = F.conv2d(F.pad(mask, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, size))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, size, 1))


def _blur_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) matrix B with ``B @ v`` = ``kernel`` convolved with ``v`` padded by reflection (edge not repeated)."""
    r = len(kernel) // 2
    if r >= n:
        raise ValueError(f"reflect padding of {r} needs more than {n} pixels")
    taps = torch.arange(n, device=kernel.device)[:, None] + torch.arange(-r, r + 1, device=kernel.device)
    taps = torch.where(taps < 0, -taps, taps)
    taps = torch.where(taps >= n, 2 * (n - 1) - taps, taps)
    return torch.zeros((n, n), device=kernel.device).scatter_add_(1, taps, kernel.expand(n, -1).contiguous())


class FaceAligner:
    """Warps faces into the model's R×R crop and pastes generated faces back (upstream's ``AlignRestore``).

    The matrices are smoothed across successive ``align`` calls (upstream's p_bias rule), so call ``align`` on the
    frames of one shot in order, and ``reset()`` whenever the face was lost (a gap) or a new clip starts.
    """

    def __init__(self, resolution: int, device: str | torch.device = "cpu"):
        self.resolution = int(resolution)
        self.device = torch.device(device)
        self.face_size, self.template = face_geometry(self.resolution)  # face_size = (w, h)
        self._p_bias: np.ndarray | None = None
        self._staging: dict[torch.device, Staging] = {}  # one per device the aligner's batches go up to

    def _staging_for(self, device: torch.device) -> Staging:
        return self._staging.setdefault(device, Staging(device))

    def reset(self) -> None:
        """Forget the smoothing state; the next ``align`` starts afresh, as upstream does per video."""
        self._p_bias = None

    def matrix(self, anchors: np.ndarray) -> np.ndarray:
        """The smoothed 2×3 frame→crop matrix for these anchors; advances the smoothing state."""
        # Upstream rounds the anchors to whole pixels before fitting.
        src = np.round(np.asarray(anchors, dtype=np.float64).reshape(3, 2))
        matrix, bias = similarity_transform(src, self.template)
        if self._p_bias is not None:
            bias = _SMOOTH_KEEP * self._p_bias + (1.0 - _SMOOTH_KEEP) * bias
        self._p_bias = bias
        matrix[:, 2] += bias
        return matrix.astype(np.float32)

    def align(self, frame_rgb: np.ndarray | torch.Tensor, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aligned face (R, R, 3) uint8 and its 2×3 float32 matrix, for an (H, W, 3) uint8 RGB frame.

        ``frame_rgb`` may be a torch tensor on any device; the warp then runs there.
        """
        matrix = self.matrix(anchors)
        return self.warp(frame_rgb, matrix), matrix

    def warp(self, frame_rgb: np.ndarray | torch.Tensor, matrix: np.ndarray) -> np.ndarray:
        """The aligned face (R, R, 3) uint8 for a known matrix: the crop, stretched to R×R with Lanczos."""
        return self.warp_batch([frame_rgb], [matrix])[0]

    def warp_batch(self, frames: list[np.ndarray | torch.Tensor], matrices: list[np.ndarray]) -> np.ndarray:
        """Aligned faces (n, R, R, 3) uint8 for frames and their known matrices.

        The warps run on the device (that of tensor frames, else the aligner's) with one transfer back for the
        whole batch; the Lanczos stretch is OpenCV's on the CPU, as upstream's, on the small crops.
        """
        crops = self._crop_batch(frames, matrices).cpu().numpy()
        size = (self.resolution, self.resolution)
        return np.stack([cv2.resize(c, size, interpolation=cv2.INTER_LANCZOS4) for c in crops])

    @torch.no_grad()
    def _crop_batch(self, frames: list[np.ndarray | torch.Tensor], matrices: list[np.ndarray]) -> torch.Tensor:
        """(n, h, w, 3) uint8 crops on the device; every frame window is uploaded before any warp is queued."""
        crop_w, crop_h = self.face_size
        corners = np.array([[0, 0, 1], [crop_w - 1, 0, 1], [0, crop_h - 1, 1], [crop_w - 1, crop_h - 1, 1]], float)
        devices = {frame.device if isinstance(frame, torch.Tensor) else self.device for frame in frames}
        if len(devices) != 1:
            raise ValueError(f"the frames of one batch must be on one device, got {sorted(map(str, devices))}")
        device = devices.pop()
        inverses, bounds = [], []
        for frame, matrix in zip(frames, matrices, strict=True):
            height, width = frame.shape[:2]
            inv = _invert(matrix)
            src_pts = corners @ inv.T
            # Only the frame pixels bilinear sampling can reach are read. The window includes every in-frame pixel
            # a sample touches, and pixels beyond the frame still read as zero, so the result equals a full warp.
            r0, r1 = _span(src_pts[:, 1], height)
            c0, c1 = _span(src_pts[:, 0], width)
            inverses.append(inv)
            # None: the crop lies wholly outside the frame, all fill
            bounds.append((r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None)
        windows, inverses_t = _upload_windows(frames, bounds, inverses, device, self._staging_for(device))
        crops = []
        for window, b, inv_t in zip(windows, bounds, inverses_t, strict=True):
            if b is None or window is None:  # one is None where the other is
                crops.append(torch.full((crop_h, crop_w, 3), int(_FILL), dtype=torch.uint8, device=device))
                continue
            r0, r1, c0, c1 = b
            rows = torch.arange(crop_h, dtype=torch.float32, device=device)
            cols = torch.arange(crop_w, dtype=torch.float32, device=device)
            grid = _sample_grid(inv_t, rows, cols, (r1 - r0, c1 - c0), (r0, c0))
            # truncation, as upstream's astype(np.uint8)
            crops.append(_warp(window, grid, _FILL)[0].permute(1, 2, 0).to(torch.uint8))
        return torch.stack(crops)

    def restore(self, frame_rgb: np.ndarray | torch.Tensor, face: torch.Tensor, matrix: np.ndarray
                ) -> np.ndarray | torch.Tensor:
        """Paste a generated face (3, R, R) in [-1, 1] back into the (H, W, 3) uint8 frame it was aligned from.

        Runs on ``face``'s device; returns the same type as ``frame_rgb`` (numpy, or a tensor on its device).
        """
        return self.restore_batch([frame_rgb], face[None], [matrix])[0]

    @torch.no_grad()
    def restore_batch(self, frames: list[np.ndarray | torch.Tensor], faces: torch.Tensor,
                      matrices: list[np.ndarray]) -> list[np.ndarray | torch.Tensor]:
        """``restore`` for each frame with its generated face ``faces[k]`` (n, 3, R, R) and matrix, on ``faces``'
        device: the frame windows go up first, the feather widths come back in one transfer, and the pasted
        windows come back in one more — no host sync per frame."""
        device = faces.device
        crop_w, crop_h = self.face_size
        picked, bounds = [], []  # the frames a face goes into, with their matrix and window bounds
        for k, (frame, matrix) in enumerate(zip(frames, matrices, strict=True)):
            height, width = frame.shape[:2]
            m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
            inv = _invert(m)
            corners = np.array([[-1, -1, 1], [crop_w, -1, 1], [-1, crop_h, 1], [crop_w, crop_h, 1]], float) @ inv.T
            # Upstream blends over the whole frame, but its weight is exactly zero beyond the warped crop rectangle
            # grown by the feather width (w_edge below, which grows with the pasted area): a window with a margin
            # of twice that width, from the rectangle's exact area, plus slack, gives the same pixels.
            area = crop_w * crop_h / max(abs(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]), 1e-12)
            margin = 2 * (int(math.sqrt(area)) // 20) + 4
            r0, r1 = _clip_span(corners[:, 1], margin, height)
            c0, c1 = _clip_span(corners[:, 0], margin, width)
            if r0 < r1 and c0 < c1:
                picked.append((k, m))
                bounds.append((r0, r1, c0, c1))
        out = list(frames)
        if not picked:
            return out
        windows, forwards = _upload_windows([frames[k] for k, _ in picked], bounds, [m for _, m in picked], device,
                                            self._staging_for(device))
        jobs = []
        for (k, m), b, w in zip(picked, bounds, windows, strict=True):
            assert w is not None  # every picked frame has its bounds, so its window
            jobs.append((k, m, b, w))
        face_crops = F.interpolate(pick_rows(faces, [k for k, *_ in jobs]).to(torch.float32), size=(crop_h, crop_w),
                                   mode="bicubic", align_corners=False, antialias=True)
        pasted, masks = [], []
        for crop, (_, _, (r0, r1, c0, c1), _), m_t in zip(face_crops, jobs, forwards, strict=True):
            rows = torch.arange(r0, r1, dtype=torch.float32, device=device)
            cols = torch.arange(c0, c1, dtype=torch.float32, device=device)
            grid = _sample_grid(m_t, rows, cols, (crop_h, crop_w), (0, 0))
            inv_face = _warp(crop[None], grid, _FILL)
            inv_face = (inv_face / 2 + 0.5).clamp(0, 1) * 255
            inv_mask = _warp(torch.ones((1, 1, crop_h, crop_w), device=device), grid, None)
            inv_mask = _erode(inv_mask, 2, 1)  # kornia.morphology.erosion with a 2×2 kernel
            pasted.append(inv_mask * inv_face)
            masks.append(inv_mask)
        sums = torch.stack([mask.sum() for mask in masks]).cpu().tolist()  # the one sync for the feather widths
        blended = []
        for total, mask, paste, (_, _, _, window) in zip(sums, masks, pasted, jobs, strict=True):
            w_edge = int(total ** 0.5) // 20
            erosion = 2 * w_edge or 3  # cv2.erode (default anchor); OpenCV reads an empty kernel as 3×3
            center = _erode(mask, erosion, erosion // 2)
            blur = 2 * w_edge + 1
            sigma = 0.3 * ((blur - 1) * 0.5 - 1) + 0.8
            soft = _gaussian_blur(center, blur, sigma)
            mixed = soft * paste + (1 - soft) * window
            blended.append(mixed.clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0))
        flat = torch.cat([b.reshape(-1) for b in blended])
        host = flat.cpu() if any(isinstance(frames[job[0]], np.ndarray) for job in jobs) else None  # one transfer
        offset = 0
        for (k, _, (r0, r1, c0, c1), _), piece in zip(jobs, blended, strict=True):
            frame, n = frames[k], piece.numel()
            if isinstance(frame, np.ndarray):
                assert host is not None  # a numpy frame in the batch: the pixels came back in the one transfer
                array = frame.copy()
                array[r0:r1, c0:c1] = host[offset:offset + n].numpy().reshape(piece.shape)
                out[k] = array
            else:
                tensor = frame.clone()
                tensor[r0:r1, c0:c1] = piece.to(frame.device)
                out[k] = tensor
            offset += n
        return out


def _invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2×3 affine matrix."""
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    (a, b, tx), (c, d, ty) = m
    det = a * d - b * c
    # Closed form: np.linalg.inv goes through a threaded BLAS, slow for a 2×2 on a busy machine.
    lin = np.array([[d, -b], [-c, a]]) / det
    return np.hstack([lin, -(lin @ np.array([tx, ty]))[:, None]])


def _span(coords: np.ndarray, size: int) -> tuple[int, int]:
    """Index range [lo, hi) of the pixels bilinear sampling can touch for these coordinates, within [0, size)."""
    lo = max(int(math.floor(coords.min())) - 1, 0)
    hi = min(int(math.ceil(coords.max())) + 2, size)
    return lo, hi


def _clip_span(coords: np.ndarray, margin: int, size: int) -> tuple[int, int]:
    """[lo, hi) covering ``coords`` plus ``margin`` pixels, within [0, size)."""
    lo = max(int(math.floor(coords.min())) - margin, 0)
    hi = min(int(math.ceil(coords.max())) + margin + 1, size)
    return lo, hi


def load_mask(path: str | Path, resolution: int) -> torch.Tensor:
    """Upstream's fixed mask (white = keep) at R×R as a float32 (1, R, R) tensor in [0, 1].

    Resized as upstream's ``load_fixed_mask``: Lanczos on uint8 (soft edges at 512), then /255.
    """
    path = Path(path)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    if image is None:
        raise InputError(f"Cannot read the face mask image {path}: it is missing or not a valid image file.")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    resized = cv2.resize(rgb, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    return torch.from_numpy(resized[:, :, 0].astype(np.float32) / 255.0).unsqueeze(0)


class SmoothingBounds:
    """Upstream's p_bias smoothing started from its lowest and from its highest possible state, over the same frames.

    Each step (0.2·p + 0.8·b, correctly rounded, then added to the matrix and rounded to float32) is monotone in the
    state p, so smoothing started in any state, after any earlier frames, gives a matrix between those of the two
    bounds: where they are equal, it is theirs.
    """

    def __init__(self, resolution: int):
        self.low, self.high = FaceAligner(resolution), FaceAligner(resolution)
        self.low._p_bias, self.high._p_bias = np.full(2, -BIAS_BOUND), np.full(2, BIAS_BOUND)

    def agree(self, anchors: np.ndarray | None) -> bool:
        """Step both bounds over one frame (None: the face missing, a reset); whether every start gives it one
        matrix."""
        if anchors is None:
            self.low.reset()
            self.high.reset()
            return True
        return bool(np.array_equal(self.low.matrix(anchors), self.high.matrix(anchors)))
