"""The embedded synthetic dataset: a small multi-modal sequence dataset with planted patterns.

``mmsr download --dataset synthetic`` (:class:`Synthetic`) writes it in the sequence format (``raw/sequences.tsv``,
``raw/items.jsonl``, ``raw/images/<item>.png``), so the whole pipeline can be tried and tested
without a network, in about a minute on two CPU cores.

Generative process (all draws from ``numpy.random.default_rng`` streams spawned from ``seed``;
one stream per concern, so e.g. ``images=False`` does not change the sequences):

1. Items. Each of ``n_items`` items gets two latent labels, drawn independently of each other
   (each a balanced random permutation):

   * a *visual class* ``v`` = (colour, shape), one of ``len(COLOURS) * len(SHAPES)`` = 24 classes.
     Classes are ordered colour-major along the hue circle (red circle, red square, ...,
     orange circle, ...), so neighbouring classes look alike;
   * a *text topic* ``t``, one of ``len(TOPICS)`` = 16 topics, ordered so that neighbouring
     topics are related (coffee -> tea -> baking -> ...).

   and a popularity weight ``1 / (rank + 5) ** 0.7`` over a random rank.

2. Item content. The image (``image_size`` square RGB PNG) draws the class's shape in the
   class's colour (position, size and colour jittered) on a random neutral background with
   pixel noise; it carries no information about the topic. The texts (title, categories,
   brand, description) use the topic's words plus generic words; the brand is random. They carry
   no information about the visual class.

3. Users. Each of ``n_users`` users follows one behaviour (probabilities ``behaviour_probs``):

   * ``visual``: a chain over visual classes: after an item of class ``v`` the next item is of
     class ``v`` (probability ``p_stay``) or ``v + 1`` (``p_next``, "continues the chain"),
     else (``1 - p_stay - p_next``) any item;
   * ``text``: the same chain over topics;
   * ``popularity``: every item drawn by popularity (noise).

   Within the chosen class/topic the item is drawn by popularity, never repeating an item of the
   same user. Sequence lengths are uniform in ``[min_len, max_len]``; the first item is drawn
   by popularity.

So an ID-only model has to learn each item's class from co-occurrence alone, while image and
text features reveal it directly; and since a user follows one modality's chain, a model must
weigh (order) the modalities per user: fusing them well beats either one alone.

4. Missing modalities. ``missing_image_frac`` of the items have no image file and another
   (disjoint) ``empty_text_frac`` have empty texts (empty title/description, no categories,
   null brand), so that downstream missing-modality handling is exercised.

The latent labels and behaviours are written to ``raw/synthetic_latent.json`` for analysis;
stages that learn from the data must not read it.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import contracts as C
from ..errors import MmsrError
from ..workdir import write_bytes_atomic
from .base import DownloadResult, Source
from .fetch import ImageResult
from .sequences import HEADER
from .sequences import SOURCE as SEQUENCES

LATENT_FILE = "synthetic_latent.json"

# (name, RGB) in hue order, so that consecutive colours (and chain neighbours) look alike.
COLOURS = (
    ("red", (215, 40, 40)),
    ("orange", (240, 135, 30)),
    ("yellow", (230, 205, 40)),
    ("green", (45, 165, 70)),
    ("blue", (40, 95, 215)),
    ("purple", (145, 60, 190)),
)
SHAPES = ("circle", "square", "triangle", "cross")

# (topic, category group, words). Consecutive topics are related; the last leads to the first.
TOPICS = (
    ("coffee", "Kitchen", ("espresso", "roast", "arabica", "brew", "grinder", "crema")),
    ("tea", "Kitchen", ("matcha", "oolong", "infuser", "kettle", "leaf", "chai")),
    ("baking", "Kitchen", ("flour", "whisk", "muffin", "dough", "oven", "pastry")),
    ("cooking", "Kitchen", ("skillet", "saute", "spatula", "wok", "simmer", "broth")),
    ("grilling", "Outdoors", ("barbecue", "charcoal", "smoker", "tongs", "brisket", "marinade")),
    ("camping", "Outdoors", ("tent", "lantern", "sleeping bag", "campfire", "cooler", "hammock")),
    ("hiking", "Outdoors", ("boots", "summit", "compass", "trekking", "trail", "ridge")),
    ("running", "Sports", ("sneakers", "marathon", "pace", "stride", "jogging", "treadmill")),
    ("fitness", "Sports", ("dumbbell", "kettlebell", "squat", "gym", "resistance", "workout")),
    ("yoga", "Sports", ("mat", "pose", "stretch", "meditation", "breath", "balance")),
    ("skincare", "Beauty", ("serum", "moisturizer", "cleanser", "toner", "hydrating", "sunscreen")),
    ("makeup", "Beauty", ("lipstick", "mascara", "eyeliner", "blush", "foundation", "palette")),
    ("haircare", "Beauty", ("shampoo", "conditioner", "curl", "keratin", "scalp", "comb")),
    ("fragrance", "Beauty", ("perfume", "cologne", "musk", "floral", "citrus", "scent")),
    ("candles", "Home", ("wax", "wick", "aroma", "soy", "lavender", "flame")),
    ("gardening", "Home", ("seeds", "soil", "pruning", "planter", "compost", "bloom")),
)
BRANDS = ("Acme", "Northwind", "Bluebird", "Keystone", "Lumen", "Orchard", "Granite", "Vela",
          "Quill", "Harbor", "Tandem", "Zephyr")
ADJECTIVES = ("Premium", "Classic", "Deluxe", "Compact", "Everyday", "Professional", "Essential",
              "Original", "Ultra", "Natural")
NOUNS = ("Set", "Kit", "Pack", "Edition", "Collection", "Bundle")
FILLER = ("Easy to clean.", "Ships in recyclable packaging.", "Backed by a one-year warranty.",
          "A thoughtful gift.", "Lightweight and durable.", "Designed for daily use.")
BACKGROUNDS = ((235, 235, 235), (222, 215, 200), (205, 210, 215), (245, 240, 230), (190, 190, 190))

BEHAVIOURS = ("visual", "text", "popularity")


@dataclass
class SyntheticInfo:
    n_users: int
    n_items: int
    n_interactions: int
    n_images: int
    latent_file: str
    item_ids: list[str]
    item_visual: list[int]  # visual class per item
    item_topic: list[int]  # text topic per item
    user_ids: list[str]
    user_behaviour: list[str]
    sequences: list[list[int]]  # item indices, oldest first
    missing_image: list[int] = field(default_factory=list)  # item indices
    empty_text: list[int] = field(default_factory=list)


def n_visual_classes() -> int:
    return len(COLOURS) * len(SHAPES)


def visual_class_name(v: int) -> tuple[str, str]:
    return COLOURS[v // len(SHAPES)][0], SHAPES[v % len(SHAPES)]


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % k)


def _draw_image(rng: np.random.Generator, v: int, size: int) -> bytes:
    # Pillow: only when images are drawn
    from PIL import Image, ImageDraw

    colour = np.array(COLOURS[v // len(SHAPES)][1]) + rng.integers(-25, 26, 3)
    fill = tuple(int(c) for c in np.clip(colour, 0, 255))
    shape = SHAPES[v % len(SHAPES)]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    r = size * float(rng.uniform(0.22, 0.34))
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 8, (size, size, 3)).round().astype(np.int16)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no timestamp chunks: same pixels -> same bytes
    return buf.getvalue()


def _item_text(rng: np.random.Generator, t: int) -> dict:
    topic, group, words = TOPICS[t]
    w = [str(x) for x in rng.permutation(words)]
    adjective = str(rng.choice(ADJECTIVES))
    noun = str(rng.choice(NOUNS))
    brand = str(rng.choice(BRANDS))
    title = f"{brand} {adjective} {w[0].title()} {w[1].title()} {noun}"
    description = (
        f"{adjective} {w[0]} and {w[1]} {noun.lower()} for every {topic} lover. "
        f"Made with {w[2]} and {w[3]} in mind. {rng.choice(FILLER)}"
    )
    return {"title": title, "categories": ["Synthetic", group, topic.title()], "brand": brand,
            "description": description}


def _chain_sequence(
    rng: np.random.Generator,
    length: int,
    labels: np.ndarray,
    n_labels: int,
    members: list[np.ndarray],
    popularity: np.ndarray,
    p_stay: float,
    p_next: float,
) -> list[int]:
    """A sequence that walks the label chain: stay on the label, step to the next, or jump."""
    n_items = len(labels)
    seen = np.zeros(n_items, dtype=bool)
    seq: list[int] = []
    item = int(rng.choice(n_items, p=popularity))
    for _ in range(length):
        seq.append(item)
        seen[item] = True
        if len(seq) == length:
            break
        u = rng.random()
        label = int(labels[item])
        if u < p_stay:
            target = label
        elif u < p_stay + p_next:
            target = (label + 1) % n_labels
        else:
            target = None
        item = -1
        for step in range(n_labels):  # an exhausted label moves the walk along the chain
            pool = np.flatnonzero(~seen) if target is None else members[(target + step) % n_labels]
            pool = pool[~seen[pool]]
            if len(pool):
                w = popularity[pool] / popularity[pool].sum()
                item = int(rng.choice(pool, p=w))
                break
        if item < 0:
            break
    return seq


def generate_synthetic(
    out_dir: Path,
    n_users: int = 1000,
    n_items: int = 300,
    seed: int = 0,
    *,
    min_len: int = 5,
    max_len: int = 20,
    images: bool = True,
    image_size: int = 64,
    behaviour_probs: tuple[float, float, float] = (0.4, 0.4, 0.2),
    p_stay: float = 0.4,
    p_next: float = 0.5,
    missing_image_frac: float = 0.02,
    empty_text_frac: float = 0.02,
) -> SyntheticInfo:
    """Write the synthetic dataset into ``out_dir`` (the dataset's ``raw/`` folder).

    Same arguments -> byte-identical files. Files are written atomically; images of an earlier
    generation that this one does not produce are removed.
    """
    if n_items < max_len or n_items < 2 * n_visual_classes():
        raise MmsrError(f"synthetic: n_items={n_items} is too small (at least {max(max_len, 2 * n_visual_classes())})")
    if n_users < 1 or not 1 <= min_len <= max_len:
        raise MmsrError(f"synthetic: need n_users >= 1 and 1 <= min_len <= max_len (got {n_users}, {min_len}, {max_len})")
    if not (0 <= p_stay and 0 <= p_next and p_stay + p_next <= 1):
        raise MmsrError(f"synthetic: p_stay + p_next must lie in [0, 1] (got {p_stay} + {p_next})")
    out_dir = Path(out_dir)
    items_rng, text_rng, image_rng, user_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    n_vis, n_top = n_visual_classes(), len(TOPICS)

    # 1. latent labels and popularity
    visual = _balanced(items_rng, n_items, n_vis)
    topic = _balanced(items_rng, n_items, n_top)
    rank = items_rng.permutation(n_items)
    popularity = 1.0 / (rank + 5.0) ** 0.7
    popularity /= popularity.sum()
    n_missing = int(round(missing_image_frac * n_items))
    n_empty = int(round(empty_text_frac * n_items))
    chosen = items_rng.permutation(n_items)[: n_missing + n_empty]
    missing_image = sorted(int(i) for i in chosen[:n_missing])
    empty_text = sorted(int(i) for i in chosen[n_missing:])
    item_ids = [f"SYN{i:07d}" for i in range(n_items)]

    # 2. content
    item_lines = []
    empty = set(empty_text)
    for i in range(n_items):
        text = _item_text(text_rng, int(topic[i]))  # drawn for every item: stable streams
        if i in empty:
            text = {"title": "", "categories": [], "brand": None, "description": ""}
        item_lines.append(json.dumps({"asin": item_ids[i], **text}, ensure_ascii=False))

    # 3. users
    members_vis = [np.flatnonzero(visual == v) for v in range(n_vis)]
    members_top = [np.flatnonzero(topic == t) for t in range(n_top)]
    probs = np.asarray(behaviour_probs, dtype=float)
    probs = probs / probs.sum()
    user_ids = [f"U{u:06d}" for u in range(n_users)]
    behaviours: list[str] = []
    sequences: list[list[int]] = []
    for _ in range(n_users):
        behaviour = BEHAVIOURS[int(user_rng.choice(3, p=probs))]
        length = int(user_rng.integers(min_len, max_len + 1))
        if behaviour == "visual":
            seq = _chain_sequence(user_rng, length, visual, n_vis, members_vis, popularity, p_stay, p_next)
        elif behaviour == "text":
            seq = _chain_sequence(user_rng, length, topic, n_top, members_top, popularity, p_stay, p_next)
        else:
            seq = [int(i) for i in user_rng.choice(n_items, size=length, replace=False, p=popularity)]
        behaviours.append(behaviour)
        sequences.append(seq)

    # write: sequences, items, images, latent labels
    out_dir.mkdir(parents=True, exist_ok=True)
    seq_lines = ["\t".join(HEADER)] + [
        f"{u}\t{' '.join(item_ids[i] for i in seq)}" for u, seq in zip(user_ids, sequences)
    ]
    write_bytes_atomic(out_dir / Path(C.RAW_SEQUENCES).name, ("\n".join(seq_lines) + "\n").encode())
    write_bytes_atomic(out_dir / Path(C.RAW_ITEMS).name, ("\n".join(item_lines) + "\n").encode())

    images_dir = out_dir / "images"
    written = set()
    if images:
        no_image = set(missing_image)
        images_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_items):
            png = _draw_image(image_rng, int(visual[i]), image_size)  # drawn for every item
            if i in no_image:
                continue
            name = C.safe_item_filename(item_ids[i]) + ".png"
            path = images_dir / name
            if not (path.exists() and path.read_bytes() == png):
                write_bytes_atomic(path, png)
            written.add(name)
    if images_dir.is_dir():
        for p in images_dir.iterdir():
            if p.is_file() and p.name not in written:
                p.unlink()

    no_image = set(missing_image)
    latent = {
        "seed": seed,
        "visual_classes": [" ".join(visual_class_name(v)) for v in range(n_vis)],
        "topics": [t[0] for t in TOPICS],
        "items": {
            item_ids[i]: {
                "visual_class": int(visual[i]),
                "topic": int(topic[i]),
                "has_image": images and i not in no_image,
                "has_text": i not in empty,
            }
            for i in range(n_items)
        },
        "users": dict(zip(user_ids, behaviours)),
    }
    write_bytes_atomic(out_dir / LATENT_FILE, (json.dumps(latent, indent=1, sort_keys=True) + "\n").encode())

    return SyntheticInfo(
        n_users=n_users,
        n_items=n_items,
        n_interactions=sum(len(s) for s in sequences),
        n_images=len(written),
        latent_file=LATENT_FILE,
        item_ids=item_ids,
        item_visual=[int(v) for v in visual],
        item_topic=[int(t) for t in topic],
        user_ids=user_ids,
        user_behaviour=behaviours,
        sequences=sequences,
        missing_image=missing_image,
        empty_text=empty_text,
    )


# ----------------------------------------------------------------------------------------------
# The source: generated, then read by the sequence format


class Synthetic(Source):
    layout = SEQUENCES.layout
    raw_files = SEQUENCES.raw_files
    names = ("synthetic",)
    base_url_refused = "the synthetic dataset is generated locally, it has no URL"

    def download(self, ds, opts, log: logging.Logger) -> DownloadResult:
        info = generate_synthetic(ds.path(C.RAW_DIR), images=opts.images)
        files = [*self.raw_files, f"{C.RAW_DIR}/{info.latent_file}"]
        images = None
        if opts.images:
            images = ImageResult(ok=info.n_images, new=info.n_images, no_url=info.n_items - info.n_images)
        size = sum(ds.path(rel).stat().st_size for rel in files)
        log.info("synthetic: %d users, %d items, %d interactions", info.n_users, info.n_items, info.n_interactions)
        return DownloadResult(
            dataset=ds.name, source="synthetic", layout=self.layout, files=files, bytes=size, transferred=size,
            skipped=0, images=images,
            counts={"users": info.n_users, "items": info.n_items, "interactions": info.n_interactions},
        )


SOURCE = Synthetic()
