"""Procedural toy videos: one coloured square or disc moving left/right/up/down, bouncing at edges.

Clips are ``[T, 3, H, W]`` float32 in ``[-1, 1]`` (the toy model's data space, pixel
space, no VAE), deterministic from ``(prompt, seed)``. A detector written for this
data (dominant colour of the moving blob, sign of its centroid motion) scores
generated clips.
"""

from __future__ import annotations

import numpy as np
import torch

COLOURS = {  # RGB in [-1, 1], far apart and far from the background
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
SHAPES = ("square", "disc")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
BACKGROUND = (-0.6, -0.6, -0.6)
PROMPTS = [f"a {c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS]
#: the eight prompts ``starflow-trt demo`` generates (every colour, shape and direction at least once)
DEMO_PROMPTS = [
    "a red square moving right", "a green disc moving left", "a blue square moving up", "a yellow disc moving down",
    "a red disc moving down", "a green square moving up", "a blue disc moving right", "a yellow square moving left",
]
OBJECT_SIZE = 5.0


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """``"a red square moving left"`` → ("red", "square", "left")."""
    words = prompt.lower().split()
    expected = (f"expected 'a <{'|'.join(COLOURS)}> <{'|'.join(SHAPES)}> moving <{'|'.join(DIRECTIONS)}>'")
    if len(words) != 5:
        raise ValueError(f"not a toy prompt: {prompt!r} has {len(words)} words; {expected}")
    slots = [("article", {"a"}), ("colour", COLOURS), ("shape", SHAPES), ("verb", {"moving"}),
             ("direction", DIRECTIONS)]
    bad = [f"unknown {name} {w!r}" for w, (name, allowed) in zip(words, slots) if w not in allowed]
    if bad:
        raise ValueError(f"not a toy prompt: {prompt!r} ({', '.join(bad)}); {expected}")
    return words[1], words[2], words[4]


def _coverage(shape: str, cy: float, cx: float, size: int) -> np.ndarray:
    """Anti-aliased coverage [size, size] of the object centred at (cy, cx), 4×4 supersampling."""
    sub = (np.arange(size * 4) + 0.5) / 4.0
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    r = OBJECT_SIZE / 2
    if shape == "square":
        inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    else:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 0.3) ** 2
    return inside.reshape(size, 4, size, 4).mean(axis=(1, 3))


def render_clip(prompt: str, seed: int, *, frames: int = 9, size: int = 16) -> torch.Tensor:
    """The clip of ``prompt`` for ``seed``: [frames, 3, size, size] float32 in [-1, 1].

    Start position, speed (1-2 px/frame) and cross-axis offset come from ``seed``; the object
    starts on the side it moves away from and bounces at the edges.
    """
    colour, shape, direction = parse_prompt(prompt)
    # the stream depends on the canonical prompt, so "A  Red disc moving LEFT" == "a red disc moving left"
    rng = np.random.default_rng([seed, PROMPTS.index(f"a {colour} {shape} moving {direction}")])
    dy, dx = DIRECTIONS[direction]
    r = OBJECT_SIZE / 2
    lo, hi = r, size - r
    speed = rng.uniform(1.0, 2.0)
    along = rng.uniform(lo, lo + 0.35 * (hi - lo))  # start on the trailing side
    across = rng.uniform(lo, hi)
    pos_along = along
    vel = speed
    bg = np.array(BACKGROUND, dtype=np.float32)[:, None, None]
    fg = np.array(COLOURS[colour], dtype=np.float32)[:, None, None]
    out = np.empty((frames, 3, size, size), dtype=np.float32)
    for t in range(frames):
        coord = pos_along if (dy + dx) > 0 else size - pos_along  # mirror for left / up
        cy, cx = (coord, across) if dy else (across, coord)
        cov = _coverage(shape, cy, cx, size)[None]
        out[t] = bg * (1 - cov) + fg * cov
        pos_along += vel
        if pos_along > hi:
            pos_along, vel = 2 * hi - pos_along, -vel
        elif pos_along < lo:
            pos_along, vel = 2 * lo - pos_along, -vel
    return torch.from_numpy(out)


def make_dataset(n: int, seed: int, *, frames: int = 9, size: int = 16) -> tuple[torch.Tensor, list[str]]:
    """``n`` clips [n, T, 3, H, W] with prompts drawn deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    prompts = [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), n)]
    seeds = rng.integers(0, 2 ** 31, n)
    return torch.stack([render_clip(p, int(s), frames=frames, size=size) for p, s in zip(prompts, seeds)]), prompts


# ------------------------------------------------------------------ detector
def _foreground_weights(clip: np.ndarray) -> np.ndarray:
    """[T, H, W] weight of each pixel being the object: distance from the background colour."""
    bg = np.array(BACKGROUND, dtype=np.float32)[None, :, None, None]
    dist = np.sqrt(((clip - bg) ** 2).sum(axis=1))
    return np.clip(dist - 0.6, 0.0, None)  # ignore small deviations (noise)


def detect_colour(clip) -> str:
    """Palette colour nearest to the foreground-weighted mean colour of the clip."""
    c = np.asarray(clip, dtype=np.float32)
    w = _foreground_weights(c)
    if w.sum() < 1e-6:
        return "none"
    mean = (c * w[:, None]).sum(axis=(0, 2, 3)) / w.sum()
    return min(COLOURS, key=lambda k: float(((np.array(COLOURS[k]) - mean) ** 2).sum()))


def detect_direction(clip) -> str:
    """Sign of the foreground centroid motion along its dominant axis (fit over all frames)."""
    c = np.asarray(clip, dtype=np.float32)
    w = _foreground_weights(c)
    T, H, W = w.shape
    ys, xs = np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32)
    mass = w.sum(axis=(1, 2))
    valid = mass > 1e-6
    if valid.sum() < 2:
        return "none"
    cy = (w.sum(axis=2) * ys).sum(axis=1)[valid] / mass[valid]
    cx = (w.sum(axis=1) * xs).sum(axis=1)[valid] / mass[valid]
    t = np.arange(T, dtype=np.float32)[valid]
    # net displacement over the first half of the clip (before most bounces)
    half = max(2, (len(t) + 1) // 2)
    vy = np.polyfit(t[:half], cy[:half], 1)[0]
    vx = np.polyfit(t[:half], cx[:half], 1)[0]
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def score_clips(clips, prompts: list[str]) -> dict:
    """Colour and direction accuracy of clips [N, T, 3, H, W] against their prompts."""
    per = []
    for clip, prompt in zip(clips, prompts):
        colour, _, direction = parse_prompt(prompt)
        got_c, got_d = detect_colour(clip), detect_direction(clip)
        per.append({"prompt": prompt, "colour": got_c, "direction": got_d,
                    "colour_ok": got_c == colour, "direction_ok": got_d == direction})
    n = max(len(per), 1)
    return {"colour_accuracy": sum(p["colour_ok"] for p in per) / n,
            "direction_accuracy": sum(p["direction_ok"] for p in per) / n, "clips": per}
