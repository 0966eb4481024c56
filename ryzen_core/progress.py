"""Progress of every phase that takes more than a few seconds: a tqdm bar on a terminal, a log line
every ~10% otherwise (CI logs, pipes), so no phase runs silent and no log fills with bar redraws."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable, Iterator, TypeVar

log = logging.getLogger("ryzen_core.progress")
T = TypeVar("T")


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class Progress:
    """`update()` once per unit of work; `postfix` values show on the bar and in the log lines.

    `total=None` (a budget in seconds, say) logs every `fallback_every` units instead.
    """

    def __init__(self, desc: str, total: int | None, unit: str = "step", enabled: bool = True, initial: int = 0,
                 fallback_every: int = 10, logger: logging.Logger = log):
        from tqdm.auto import tqdm

        self.desc, self.total, self.unit, self.enabled, self.logger = desc, total, unit, enabled, logger
        self.every = max(1, total // 10) if total else fallback_every
        self.done = initial
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not (enabled and interactive()),
                        dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix)
        if self.bar.disable and self.enabled and (self.done == 1 or self.done == self.total
                                                  or self.done // self.every > (self.done - n) // self.every):
            details = "".join(f" {k} {v}" for k, v in postfix.items())
            self.logger.info("%s %s %d/%s%s", self.desc, self.unit, self.done, self.total or "?", details)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect = logging_redirect_tqdm()  # log lines print above the bar instead of breaking it
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self._redirect.__exit__(*exc)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "step") -> Iterator[T]:
    """Iterate over `items`, showing progress as `Progress` does."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with Progress(desc, total if total is not None else len(items), unit) as bar:  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.update()
