"""Progress while staging: a bar per running input, one for inputs done, one for tokens (with
tokens/s), drawn by tqdm in the driver.

Tasks run in other processes (other machines, on a cluster), so they report to a small Ray actor
(``report(task, rows, tokens)`` after each batch, fire-and-forget) that the driver polls while it
waits for results. With progress off no actor is started and tasks report nothing.
"""

from __future__ import annotations

from tqdm import tqdm

from data_prep.sources import Task


class Board:
    """Ray actor: the latest (rows, tokens) of every running task."""

    def __init__(self) -> None:
        self.state: dict[int, tuple[int, int]] = {}

    def report(self, task: int, rows: int, tokens: int) -> None:
        self.state[task] = (rows, tokens)

    def snapshot(self) -> dict[int, tuple[int, int]]:
        return dict(self.state)


class StageProgress:
    def __init__(self, ray, n_tasks: int, done_tasks: int, done_tokens: int, enabled: bool):
        self.ray = ray
        self.enabled = enabled
        kw = {"disable": not enabled, "mininterval": 0.5, "dynamic_ncols": True}
        self.inputs = tqdm(total=n_tasks, initial=done_tasks, desc="inputs", unit="input", **kw)
        self.tokens = tqdm(initial=done_tokens, desc="tokens", unit="tok", unit_scale=True, **kw)
        self.kw = kw
        self.bars: dict[int, tqdm] = {}
        self.seen: dict[int, int] = {}
        self.board = ray.remote(num_cpus=0)(Board).remote() if enabled else None

    def started(self, task: Task) -> None:
        if self.enabled:
            self.bars[task.index] = tqdm(total=task.rows, desc=task.label, unit="doc",
                                         leave=False, **self.kw)

    def poll(self) -> None:
        if not self.enabled:
            return
        for index, (rows, tokens) in self.ray.get(self.board.snapshot.remote()).items():
            bar = self.bars.get(index)
            if bar is not None:
                bar.update(rows - bar.n)
                self.tokens.update(tokens - self.seen.get(index, 0))
                self.seen[index] = tokens

    def finished(self, task: Task, tokens: int) -> None:
        bar = self.bars.pop(task.index, None)
        if bar is not None:
            bar.close()
        self.tokens.update(tokens - self.seen.pop(task.index, 0))
        self.inputs.update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.inputs.close()
        self.tokens.close()
        if self.board is not None:
            self.ray.kill(self.board)
