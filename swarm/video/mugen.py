"""MUGEN-like game clips, generated: the real MUGEN set (CoinRun clips with text and audio) is not reachable offline.

A clip is drawn from a ``Script``: the character walks, runs or stands, jumps (a parabolic arc), jumps over gaps in
the ground and collects coins (which disappear), while the camera follows it, so the ground and coins scroll by and
background blocks and clouds scroll slower (parallax). The same script gives the clip's video, its description (a
small fixed vocabulary) and its audio (a short tone at each event's frame, one pitch per kind of event).

Everything is deterministic from ``(seed, index)``: a clip does not depend on which clips were read before it.
Geometry is in screen widths (1.0 = ``size`` pixels) and time in frames, so one script renders at any size.
Flat colours from an 8-colour palette and 1-2 px/frame motion keep the clips learnable by a tiny VQ autoencoder.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

__all__ = [
    "EVENTS",
    "PALETTE",
    "VOCABULARY",
    "MugenLikeClips",
    "Script",
    "describe",
    "make_audio",
    "make_script",
    "render_clip",
    "tokenize_text",
]

# Palette indices, painted back to front.
SKY, CLOUD, BLOCK, GRASS, DIRT, BODY, SKIN, COIN = range(8)
PALETTE = torch.tensor(
    [
        [0.55, 0.78, 0.95],  # sky
        [0.97, 0.97, 0.97],  # cloud
        [0.36, 0.52, 0.62],  # background block
        [0.30, 0.70, 0.25],  # grass (top row of the ground)
        [0.55, 0.35, 0.20],  # dirt
        [0.85, 0.15, 0.20],  # character's body
        [1.00, 0.80, 0.60],  # character's head
        [1.00, 0.85, 0.10],  # coin
    ]
)

EVENTS = ("jump", "gap", "collect")  # "gap": the frame the character is above a gap it jumps over
PITCH = {"jump": 440.0, "gap": 262.0, "collect": 1320.0}  # Hz of each event's tone

VOCABULARY: list[str] = [
    "the", "character", "walks", "runs", "stands", "still", "right", "left", "and", "then",
    "jumps", "over", "a", "gap", "gaps", "collects", "coin", "coins", "two", "three", "twice", "times",
]  # fmt: skip
_WORD_IDS = {word: i for i, word in enumerate(VOCABULARY)}

GROUND = 0.75  # top of the ground band, screen heights from the top
JUMP_HEIGHT = 0.22  # apex of a jump, screen heights
JUMP_SECONDS = 0.75
SPEEDS = {"walks": (0.22, 0.32), "runs": (0.45, 0.6), "stands": (0.0, 0.0)}  # screen widths per second
MAX_REPEAT = 3  # at most "three times" / "three coins" in a row, so the vocabulary stays fixed

# The character in sprite pixels (scaled by size // 32): head, body, and two leg poses; -1 is transparent.
_TOP = [[-1, SKIN, SKIN, -1], [-1, SKIN, SKIN, SKIN], [BODY] * 4, [BODY] * 4]
_LEGS_APART = [[-1, BODY, BODY, -1], [BODY, -1, -1, BODY]]
_LEGS_TOGETHER = [[-1, BODY, BODY, -1], [-1, BODY, BODY, -1]]
SPRITES = (torch.tensor(_TOP + _LEGS_APART), torch.tensor(_TOP + _LEGS_TOGETHER))  # facing right
SPRITE_H, SPRITE_W = SPRITES[0].shape


@dataclass(frozen=True)
class Script:
    """One clip's world and events. x in screen widths (world coordinates), y in screen heights from the top."""

    frames: int
    fps: int
    motion: str  # "walks", "runs" or "stands"
    direction: int  # +1 right, -1 left, 0 standing
    speed: float  # screen widths per second
    jump_frames: int  # frames from take-off to landing
    jumps: tuple[int, ...]  # take-off frames
    gaps: tuple[tuple[float, float], ...]  # world x intervals without ground
    coins: tuple[tuple[float, float, int | None], ...]  # world x, y of the centre, frame collected (None: never)
    blocks: tuple[tuple[float, float, float], ...]  # background blocks: x0, width, height (parallax coordinates)
    clouds: tuple[tuple[float, float, float], ...]  # x0, width, y
    events: tuple[tuple[int, str], ...]  # (frame, name) sorted by frame, names from EVENTS

    def x(self, frame: float) -> float:
        """The character's centre at ``frame`` (world x); the camera keeps it at a fixed screen position."""
        return self.direction * self.speed / self.fps * frame

    def height(self, frame: float) -> float:
        """How high the character's feet are above the ground at ``frame``: a parabola per jump."""
        for start in self.jumps:
            tau = (frame - start) / self.jump_frames
            if 0.0 <= tau <= 1.0:
                return 4.0 * JUMP_HEIGHT * tau * (1.0 - tau)
        return 0.0

    @property
    def anchor(self) -> float:
        """Screen x of the character: more of the world is shown ahead of it."""
        return 0.5 - 0.1 * self.direction


def _phrase_keys(events: tuple[tuple[int, str], ...] | list[tuple[int, str]]) -> list[str]:
    """The description's phrases in order: a jump followed by its gap is one "gap" phrase."""
    keys = []
    i = 0
    while i < len(events):
        name = events[i][1]
        if name == "jump" and i + 1 < len(events) and events[i + 1][1] == "gap":
            keys.append("gap")
            i += 2
            continue
        keys.append({"jump": "jump", "collect": "coin", "gap": "gap"}[name])
        i += 1
    return keys


def _longest_run(keys: list[str]) -> int:
    longest, run = 0, 0
    for i, key in enumerate(keys):
        run = run + 1 if i and key == keys[i - 1] else 1
        longest = max(longest, run)
    return longest


def _scenery(rng: random.Random, lo: float, hi: float, parallax: float, cloud: bool) -> list[tuple[float, ...]]:
    """Blocks or clouds covering what the camera shows of a layer with this parallax over camera range [lo, hi]."""
    items = []
    x = parallax * lo - rng.uniform(0.05, 0.35)
    while x < parallax * hi + 1.05:
        if cloud:
            width, third = rng.uniform(0.12, 0.25), rng.uniform(0.06, 0.3)  # third: y of the cloud's top
        else:
            width, third = rng.uniform(0.08, 0.18), rng.uniform(0.08, 0.28)  # third: the block's height
        items.append((x, width, third))
        x += width + rng.uniform(0.08, 0.4 if cloud else 0.3)
    return items


def make_script(seed: int, index: int, frames: int = 16, fps: int = 8) -> Script:
    """The script of clip ``index`` of the dataset with ``seed``: a fresh RNG per clip, so reading order is moot."""
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {frames}")
    rng = random.Random(f"mugen-like:{seed}:{index}")  # str seeds hash with SHA-512: stable across processes
    motion = rng.choices(list(SPEEDS), weights=[0.55, 0.3, 0.15])[0]
    direction = 0 if motion == "stands" else rng.choice([1, 1, -1])
    speed = rng.uniform(*SPEEDS[motion])
    jump_frames = max(3, round(JUMP_SECONDS * fps))
    partial = Script(frames, fps, motion, direction, speed, jump_frames, (), (), (), (), (), ())
    step = speed / fps  # screen widths per frame

    events: list[tuple[int, str]] = []
    jumps: list[int] = []
    gaps: list[tuple[float, float]] = []
    coins: list[tuple[float, float, int | None]] = []
    moving = direction != 0
    actions = ["jump", "coin_jump", "wait"] + (["gap", "coin", "coin"] if moving else [])
    half_width = SPRITE_W / 2 / 32
    t = rng.randint(1, 3)
    while True:
        action = rng.choice(actions)
        airborne = action in ("jump", "gap", "coin_jump")
        if t + (jump_frames if airborne else 0) > frames - 1:
            break  # the last action must be over (landed) within the clip
        new = {
            "wait": [],
            "jump": [(t, "jump")],
            "gap": [(t, "jump"), (t + jump_frames // 2, "gap")],
            "coin": [(t, "collect")],
            "coin_jump": [(t, "jump"), (t + jump_frames // 2, "collect")],
        }[action]
        if new and _longest_run(_phrase_keys(events + new)) > MAX_REPEAT:
            action, new, airborne = "wait", [], False
        events += new
        if airborne:
            jumps.append(t)
        if action == "gap":
            travel = step * jump_frames  # the gap is narrower than the distance covered in the air
            centre = partial.x(t + jump_frames / 2)
            gaps.append((centre - 0.22 * travel, centre + 0.22 * travel))
        elif action == "coin":  # the character's front edge reaches the coin's centre at frame t
            coins.append((partial.x(t) + direction * half_width, GROUND - SPRITE_H / 2 / 32, t))
        elif action == "coin_jump":  # the head reaches the coin at the apex
            apex = t + jump_frames // 2
            coins.append((partial.x(apex), GROUND - JUMP_HEIGHT - SPRITE_H / 32 + 1 / 32, apex))
        t += (jump_frames + 1 if airborne else 1) + rng.randint(0, 2)

    cams = [partial.x(0) - partial.anchor, partial.x(frames - 1) - partial.anchor]
    lo, hi = min(cams), max(cams)
    for _ in range(rng.randint(0, 2)):  # out of reach above the jumps: never collected, never described
        coins.append((rng.uniform(lo + 0.05, hi + 0.95), rng.uniform(0.16, 0.24), None))
    blocks = _scenery(rng, lo, hi, 0.5, cloud=False)
    clouds = _scenery(rng, lo, hi, 0.25, cloud=True)
    return Script(
        frames, fps, motion, direction, speed, jump_frames, tuple(jumps), tuple(gaps), tuple(coins),
        tuple(blocks), tuple(clouds), tuple(sorted(events)),
    )  # fmt: skip


def describe(script: Script) -> str:
    """The clip's text, e.g. "the character walks right and jumps over a gap then collects two coins"."""
    if script.motion == "stands":
        text = "the character stands still"
    else:
        text = f"the character {script.motion} {'right' if script.direction > 0 else 'left'}"
    runs: list[list] = []  # [key, count]
    for key in _phrase_keys(script.events):
        if runs and runs[-1][0] == key:
            runs[-1][1] += 1
        else:
            runs.append([key, 1])
    count_words = {2: "two", 3: "three"}
    phrases = []
    for key, n in runs:
        if key == "jump":
            phrases.append("jumps" if n == 1 else "jumps twice" if n == 2 else f"jumps {count_words[n]} times")
        elif key == "gap":
            phrases.append("jumps over a gap" if n == 1 else f"jumps over {count_words[n]} gaps")
        else:
            phrases.append("collects a coin" if n == 1 else f"collects {count_words[n]} coins")
    return text + (" and " + " then ".join(phrases) if phrases else "")


def tokenize_text(text: str) -> list[int]:
    """Word indices in ``VOCABULARY``; a word outside it is an error, not silently dropped."""
    ids = []
    for word in text.split():
        if word not in _WORD_IDS:
            raise ValueError(f"{word!r} is not in the MUGEN-like vocabulary")
        ids.append(_WORD_IDS[word])
    return ids


def _rects(
    left: torch.Tensor,
    width: torch.Tensor,
    top: torch.Tensor,
    height: torch.Tensor,
    size: int,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """(T, H, W) mask of N axis-aligned rectangles. left: (T, N) screen x of their left edges, per frame; width, top,
    height: (N,); visible: optional (T, N). Screen units, snapped to whole pixels so a moving rectangle keeps its
    width instead of flickering by a pixel."""
    idx = torch.arange(size)
    x0 = torch.round(left * size)
    x1 = x0 + torch.clamp(torch.round(width * size), min=1)
    y0 = torch.round(top * size)
    y1 = y0 + torch.clamp(torch.round(height * size), min=1)
    columns = (idx >= x0[..., None]) & (idx < x1[..., None])  # (T, N, W)
    if visible is not None:
        columns &= visible[..., None]
    rows = (idx >= y0[:, None]) & (idx < y1[:, None])  # (N, H)
    return (columns[:, :, None, :] & rows[None, :, :, None]).any(dim=1)


def _columns(items: tuple) -> list[torch.Tensor]:
    return [torch.tensor(values, dtype=torch.float64) for values in zip(*items, strict=True)]


def render_clip(script: Script, size: int = 32) -> torch.Tensor:
    """The clip as a float32 (frames, 3, size, size) tensor in [0, 1]."""
    frames, unit = script.frames, 1 / 32  # unit: one sprite pixel in screen units, whatever the size
    cam = torch.tensor([script.x(f) - script.anchor for f in range(frames)], dtype=torch.float64)
    labels = torch.full((frames, size, size), SKY, dtype=torch.long)

    if script.clouds:  # a flat body with a puff on top, at a quarter of the camera's speed
        x0, width, top = _columns(script.clouds)
        left = x0[None, :] - 0.25 * cam[:, None]
        thick = torch.full_like(top, 3 * unit)
        body = _rects(left, width, top + 2 * unit, thick, size)
        labels[body | _rects(left + width / 4, width / 2, top, thick, size)] = CLOUD
    if script.blocks:  # standing on the ground line, at half the camera's speed
        x0, width, height = _columns(script.blocks)
        labels[_rects(x0[None, :] - 0.5 * cam[:, None], width, GROUND - height, height, size)] = BLOCK

    # Ground, with the gaps cut out: a column is in a gap if its centre's world x is.
    centres = cam[:, None] + (torch.arange(size, dtype=torch.float64) + 0.5) / size  # (T, W) world x
    solid = torch.ones(frames, size, dtype=torch.bool)
    for a, b in script.gaps:
        solid &= (centres < a) | (centres >= b)
    ground_row = round(GROUND * size)
    grass_rows = max(1, size // 32)
    rows = torch.arange(size)[None, :, None]
    labels[solid[:, None, :] & (rows >= ground_row) & (rows < ground_row + grass_rows)] = GRASS
    labels[solid[:, None, :] & (rows >= ground_row + grass_rows)] = DIRT

    if script.coins:  # a collected coin is gone from its frame on
        x, y, taken = zip(*script.coins, strict=True)
        side = torch.full((len(x),), 2 * unit, dtype=torch.float64)
        left = torch.tensor(x, dtype=torch.float64)[None, :] - cam[:, None] - unit
        visible = torch.tensor([[f is None or t < f for f in taken] for t in range(frames)])
        labels[_rects(left, side, torch.tensor(y, dtype=torch.float64) - unit, side, size, visible)] = COIN

    scale = max(1, size // 32)
    sprites = [s.repeat_interleave(scale, 0).repeat_interleave(scale, 1) for s in SPRITES]
    if script.direction < 0:
        sprites = [s.flip(1) for s in sprites]
    h, w = sprites[0].shape
    left = round(script.anchor * size) - w // 2
    for t in range(frames):
        lift = script.height(t)
        if lift > 0 or script.direction == 0:
            sprite = sprites[0 if lift > 0 else 1]
        else:
            sprite = sprites[(t // 2) % 2]  # a walk cycle: legs apart, then together, two frames each
        top = round((GROUND - lift) * size) - h
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + h, size), min(left + w, size)
        if r0 >= r1 or c0 >= c1:
            continue
        part = sprite[r0 - top : r1 - top, c0 - left : c1 - left]
        view = labels[t, r0:r1, c0:c1]
        view[part >= 0] = part[part >= 0]
    return PALETTE[labels].permute(0, 3, 1, 2).contiguous()


def make_audio(script: Script, audio_rate: int = 8000) -> torch.Tensor:
    """A float32 mono waveform, silent except a tone of 0.6 frame at each event's frame (pitch by event)."""
    per_frame = audio_rate / script.fps
    audio = torch.zeros(round(audio_rate * script.frames / script.fps), dtype=torch.float32)
    length = max(1, int(0.6 * per_frame))
    n = torch.arange(length, dtype=torch.float64)
    envelope = torch.sin(math.pi * (n + 0.5) / length)  # no clicks, and non-zero over the whole tone
    for frame, name in script.events:
        start = round(frame * per_frame)
        tone = 0.5 * envelope * torch.sin(2 * math.pi * PITCH[name] * (n + 0.5) / audio_rate)
        end = min(start + length, audio.numel())
        audio[start:end] += tone[: end - start].float()
    return audio


class MugenLikeClips(Dataset):
    """``num_clips`` MUGEN-like clips; item ``index`` is the same on every read, in any order, in any process."""

    def __init__(
        self, num_clips: int, frames: int = 16, size: int = 32, seed: int = 0, fps: int = 8, audio_rate: int = 8000
    ) -> None:
        if size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {size}")
        self.num_clips, self.frames, self.size = num_clips, frames, size
        self.seed, self.fps, self.audio_rate = seed, fps, audio_rate

    def __len__(self) -> int:
        return self.num_clips

    def script(self, index: int) -> Script:
        """The script of item ``index``."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} out of range for {self.num_clips} clips")
        return make_script(self.seed, index, self.frames, self.fps)

    def __getitem__(self, index: int) -> dict:
        script = self.script(int(index))
        text = describe(script)
        return {
            "video": render_clip(script, self.size),
            "text": text,
            "text_ids": torch.tensor(tokenize_text(text), dtype=torch.long),
            "audio": make_audio(script, self.audio_rate),
            "events": list(script.events),
        }
