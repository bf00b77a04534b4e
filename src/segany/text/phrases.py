"""Phrases for text-prompt training and evaluation.

* Category names (COCO things and stuff, clothing labels) -> clean names ("wall-brick" -> "brick wall")
  -> varied phrases: synonyms and templates ("a photo of a {}", "the {}", ...).
* Synthetic shapes: an attribute query (any of colour, shape, position) -> a phrase ("the red circle on
  the left", "the circles", "everything blue"); the target of a query is the union of every shape that
  matches it, so a phrase is never asked to pick one of two identical shapes.
"""

from __future__ import annotations

import numpy as np

#: A few synonyms per category (the category's own clean name is always one of the choices).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("people", "human", "pedestrian"),
    "bicycle": ("bike",),
    "motorcycle": ("motorbike",),
    "airplane": ("aeroplane", "plane"),
    "couch": ("sofa",),
    "tv": ("television", "tv screen"),
    "cell phone": ("mobile phone", "phone"),
    "dining table": ("table",),
    "potted plant": ("houseplant", "plant"),
    "sports ball": ("ball",),
    "hair drier": ("hair dryer",),
    "car": ("automobile",),
    "laptop": ("notebook computer",),
    "sky": ("the sky above",),
    "t-shirt": ("tee shirt", "tshirt"),
    "pants": ("trousers",),
    "sneakers": ("trainers",),
}

TEMPLATES = ("{}", "a {}", "the {}", "a photo of a {}", "the {} in the picture", "segment the {}", "all the {}")

_QUALIFIERS = {"other", "merged", "stuff"}


def clean_category(name: str) -> str:
    """COCO panoptic names to plain words: "sky-other-merged" -> "sky", "wall-brick" -> "brick wall"."""
    parts = [p for p in name.replace("_", " ").split("-") if p and p not in _QUALIFIERS]
    if not parts:
        return name
    if len(parts) == 2 and " " not in parts[0]:  # "floor-wood" -> "wood floor"
        return f"{parts[1]} {parts[0]}"
    if name == "playingfield":
        return "playing field"
    return " ".join(parts)


def category_phrase(name: str, rng: np.random.Generator | None = None) -> str:
    """A phrase for category ``name``: random synonym and template, or the clean name when ``rng`` is None."""
    clean = clean_category(name)
    if rng is None:
        return clean
    words = _category_words(clean)
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(words[int(rng.integers(len(words)))])


def _category_words(clean: str) -> tuple[str, ...]:
    return (clean, *SYNONYMS.get(clean, ()))


def wordings(query: str | dict) -> list[str]:
    """Every phrase :func:`category_phrase` / :func:`attribute_phrase` can make for a query (sorted)."""
    if isinstance(query, dict):
        return sorted(set(_attribute_options(query)))
    return sorted({t.format(w) for t in TEMPLATES for w in _category_words(clean_category(query))})


# ---------------------------------------------------------------------------------------------------
# synthetic shapes

#: Attribute subsets a query may use, most specific first.
QUERY_KINDS: tuple[tuple[str, ...], ...] = (
    ("color", "shape", "position"),
    ("color", "shape"),
    ("shape", "position"),
    ("color", "position"),
    ("shape",),
    ("color",),
)


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"on the {position}"


def _plural(shape: str) -> str:
    return shape + "s"


def attribute_phrase(query: dict[str, str], rng: np.random.Generator | None = None) -> str:
    """A phrase for an attribute query ``{"color"?, "shape"?, "position"?}``; canonical when ``rng`` is None."""
    options = _attribute_options(query)
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _attribute_options(query: dict[str, str]) -> list[str]:
    """Every wording of an attribute query, the canonical one first."""
    c, s, p = query.get("color"), query.get("shape"), query.get("position")
    if c and s and p:
        options = [f"the {c} {s} {_where(p)}", f"{c} {s} {_where(p)}", f"the {c} {s} that is {_where(p)}"]
    elif c and s:
        options = [f"the {c} {s}", f"{c} {s}", f"the {c} {_plural(s)}", f"a {c} {s}"]
    elif s and p:
        options = [f"the {s} {_where(p)}", f"{s} {_where(p)}", f"the {_plural(s)} {_where(p)}"]
    elif c and p:
        options = [f"the {c} shape {_where(p)}", f"{c} things {_where(p)}", f"the {c} object {_where(p)}"]
    elif s:
        options = [f"the {s}", f"the {_plural(s)}", f"all {_plural(s)}", s]
    elif c:
        options = [f"the {c} shape", f"everything {c}", f"{c} things", f"the {c} objects"]
    else:
        raise ValueError("an attribute query needs at least one of color, shape, position")
    return options


def attribute_queries(
    attributes: list[dict], kinds: tuple[tuple[str, ...], ...] = QUERY_KINDS
) -> list[tuple[dict, list[int]]]:
    """Every distinct query the shapes of one scene support, with the indices of the shapes it names.

    Args:
        attributes: per shape ``{"color", "shape", "position", ...}`` (see ``generate_scene``).
    Returns:
        ``[(query, [shape indices])]`` in a fixed order (shape order, then ``kinds`` order).
    """
    seen: dict[tuple, tuple[dict, list[int]]] = {}
    for a in attributes:
        for kind in kinds:
            q = {k: a[k] for k in kind}
            key = tuple(sorted(q.items()))
            if key not in seen:
                members = [j for j, b in enumerate(attributes) if all(b[k] == v for k, v in q.items())]
                seen[key] = (q, members)
    return list(seen.values())


def shape_phrases(color: str, shape: str, position: str) -> list[str]:
    """Canonical phrases for one shape, most specific first (one per query kind)."""
    a = {"color": color, "shape": shape, "position": position}
    return [attribute_phrase({k: a[k] for k in kind}) for kind in QUERY_KINDS]
