"""Templated prompts with labeled attributes, for supervised reference dictionaries (Makelov et al. 2024).

A `TemplateTask` fills the slots of a few templates from pools of values; every prompt knows its attributes
(each slot's value, plus what the template itself encodes, such as the order of the names), the token the
model should predict (`answer`) and the one it should not (`distractor`). `counterfactual` rewrites one
attribute of a prompt, which is what a dictionary's "control" edit is scored against.

`ioi_task()` is the indirect-object identification task: "When Mary and John went to the store, John gave
the book to" -> " Mary" (the indirect object, IO) rather than " John" (the subject, S). Its attributes are
`io`, `s`, `pos` (whether IO or S is named first), `frame` (which sentence), `place` and `object`. The names,
places and objects are common English words that are single tokens in GPT-2 and Llama-style tokenizers; the
logit difference uses the first token of " " + name in any case, so any tokenizer works.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import product
from string import Formatter

__all__ = ["IOI_NAMES", "IOI_OBJECTS", "IOI_PLACES", "LabeledPrompt", "TemplateTask", "ioi_task"]


@dataclass(frozen=True)
class LabeledPrompt:
    """One filled template: its text, its attributes, and the right and wrong next word."""

    template: str
    slots: tuple[tuple[str, str], ...]
    text: str
    attributes: dict[str, str] = field(hash=False)
    answer: str
    distractor: str


@dataclass(frozen=True)
class TemplateTask:
    """Templates with `{slot}` fields, value pools per slot, and attributes each template carries.

    `template_attributes[t]` are attributes fixed by template `t` (e.g. {"pos": "io_first", "frame": "0"});
    every template must define the same attribute names. `distinct` lists slot pairs that must differ.
    """

    name: str
    templates: dict[str, str]
    pools: dict[str, tuple[str, ...]]
    template_attributes: dict[str, dict[str, str]]
    answer: str
    distractor: str
    distinct: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for tid, text in self.templates.items():
            slots = {f for _, f, _, _ in Formatter().parse(text) if f}
            if slots != set(self.pools):
                raise ValueError(
                    f"template {tid!r} has slots {sorted(slots)} but the pools are {sorted(self.pools)}; "
                    "every template must use every pool's slot"
                )
        names = {frozenset(a) for a in self.template_attributes.values()}
        if set(self.template_attributes) != set(self.templates) or len(names) != 1:
            raise ValueError("every template needs the same set of template attributes")
        if names.pop() & set(self.pools):
            raise ValueError("template attributes and slots must have different names")
        if self.answer not in self.pools or self.distractor not in self.pools:
            raise ValueError(f"answer {self.answer!r} and distractor {self.distractor!r} must be slots")

    @property
    def attributes(self) -> list[str]:
        """Attribute names: the slots, then the template attributes."""
        return [*self.pools, *next(iter(self.template_attributes.values()))]

    def values(self, attribute: str) -> list[str]:
        """Every value an attribute takes, in a fixed order."""
        if attribute in self.pools:
            return list(self.pools[attribute])
        seen = dict.fromkeys(a[attribute] for a in self.template_attributes.values())
        if not seen:
            raise ValueError(f"unknown attribute {attribute!r}; the task has {self.attributes}")
        return list(seen)

    def valid(self, slots: dict[str, str]) -> bool:
        return all(slots[a] != slots[b] for a, b in self.distinct)

    def prompt(self, template: str, slots: dict[str, str]) -> LabeledPrompt:
        return LabeledPrompt(
            template=template,
            slots=tuple(sorted(slots.items())),
            text=self.templates[template].format(**slots),
            attributes={**slots, **self.template_attributes[template]},
            answer=slots[self.answer],
            distractor=slots[self.distractor],
        )

    def sample(self, n: int, seed: int = 0) -> list[LabeledPrompt]:
        """`n` prompts drawn uniformly (template and every slot), the distinctness constraints held."""
        rng = random.Random(seed)
        prompts: list[LabeledPrompt] = []
        while len(prompts) < n:
            slots = {s: rng.choice(pool) for s, pool in self.pools.items()}
            if self.valid(slots):
                prompts.append(self.prompt(rng.choice(list(self.templates)), slots))
        return prompts

    def all_prompts(self) -> list[LabeledPrompt]:
        """Every valid (template, slot values) combination once: a design in which the attributes are as
        independent as the constraints allow."""
        grid = [dict(zip(self.pools, combo, strict=True)) for combo in product(*self.pools.values())]
        return [self.prompt(t, slots) for t in self.templates for slots in grid if self.valid(slots)]

    def counterfactual(self, prompt: LabeledPrompt, attribute: str, value: str) -> LabeledPrompt | None:
        """`prompt` with `attribute` set to `value`, or None when that breaks a constraint or no template has
        that combination of template attributes."""
        slots = dict(prompt.slots)
        if attribute in self.pools:
            slots[attribute] = value
            return self.prompt(prompt.template, slots) if self.valid(slots) else None
        wanted = {**self.template_attributes[prompt.template], attribute: value}
        match = [t for t, a in self.template_attributes.items() if a == wanted]
        return self.prompt(match[0], slots) if match else None

    def edit_target(
        self, prompt: LabeledPrompt, attribute: str, allowed: set[str] | None = None
    ) -> LabeledPrompt | None:
        """The counterfactual for the next value of `attribute` (cyclically, among `allowed` if given) that
        gives a valid prompt."""
        values = self.values(attribute)
        start = values.index(prompt.attributes[attribute])
        for step in range(1, len(values)):
            value = values[(start + step) % len(values)]
            if allowed is not None and value not in allowed:
                continue
            cf = self.counterfactual(prompt, attribute, value)
            if cf is not None:
                return cf
        return None


IOI_NAMES = ("Mary", "John", "Tom", "James", "Kate", "Paul", "Anne", "Mike")
IOI_PLACES = ("store", "garden", "school", "office", "park", "station")
IOI_OBJECTS = ("book", "ring", "apple", "key", "drink", "basket")

# Each frame in two orders: IO named first ("ABBA" in the IOI literature) or S named first ("BABA").
_IOI_FRAMES = (
    "When {first} and {second} went to the {place}, {s} gave the {object} to",
    "After {first} and {second} arrived at the {place}, {s} handed the {object} to",
    "While {first} and {second} were working at the {place}, {s} passed the {object} to",
)


def ioi_task() -> TemplateTask:
    """The indirect-object identification task: 3 frames x 2 name orders, 8 names, 6 places, 6 objects."""
    templates, attributes = {}, {}
    for i, frame in enumerate(_IOI_FRAMES):
        for pos, (first, second) in {"io_first": ("{io}", "{s}"), "s_first": ("{s}", "{io}")}.items():
            tid = f"{pos}_{i}"
            templates[tid] = frame.replace("{first}", first).replace("{second}", second)
            attributes[tid] = {"pos": pos, "frame": str(i)}
    return TemplateTask(
        name="ioi",
        templates=templates,
        pools={"io": IOI_NAMES, "s": IOI_NAMES, "place": IOI_PLACES, "object": IOI_OBJECTS},
        template_attributes=attributes,
        answer="io",
        distractor="s",
        distinct=(("io", "s"),),
    )
