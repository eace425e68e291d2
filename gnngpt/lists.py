"""The values of list flags (--models, --graphs, --pos, --seed, --learning_rate), split at commas and checked
alike: a list that names nothing, an empty item and an item given twice are refused."""
from .errors import UsageError


def list_items(text, flag, example, items=None):
    """The stripped items of a list flag's value text (items: text split already, as --graphs splits it outside
    brackets); UsageError when it names nothing (example: a list to give instead) or has an empty item."""
    items = [item.strip() for item in (text.split(",") if items is None else items)]
    if not any(items):
        raise UsageError(f"{flag} {text!r} names nothing; give a comma-separated list such as {example}")
    if "" in items:
        raise UsageError(f"{flag} {text!r} has an empty item; remove the extra comma")
    return items


def refuse_twice(values, what, shown=str):
    """UsageError for the first of values given twice (what: the flags that gave them; shown: how to name one)."""
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        raise UsageError(f"{what} names {shown(twice)} twice; give each once")
