"""When batched FREE runs its deep pass: deferral policies and a cost model that chooses one.

In a batch, FREE as published runs the deep layers as soon as one example's token needs them, and
every other example waits for that pass. With a deferral policy an example whose token needs the
deep layers *waits* instead, holding its position, while the others keep taking shallow steps (their
stacks grow); the pass runs once enough examples wait or one has waited long enough. Waiting changes
no output: a waiting example's prefix does not move, so the token it finally gets is the one it
would have got at once (its shallow layers are simply recomputed, identically, while it waits), and
every exited token is still covered by exactly one pass. Outputs therefore equal per-example FREE
under any schedule (tested with random schedules), which leaves the schedule free to optimise.

A policy (`FreeSpec.min_waiting`, `FreeSpec.max_wait`, traced: a new policy never recompiles):
run the pass when at least `min_waiting` examples wait, or one has waited `max_wait` shallow
steps, or every unfinished example waits. (1, 0) is FREE as published.

`plan_deferral` picks the policy with the lowest expected cost per token from measured step costs
(a shallow step at this batch size; a deep pass at each static width; `benchmarks.decode_bounds.
component_times` measures them) by simulating the decoder's schedule with exits drawn at a given
rate. The model is coarse (independent exits); it only chooses a schedule, never an output.

    >>> costs = StepCosts(shallow=1.0, deep={1: 3.0, 2: 3.2, 4: 3.6, 8: 4.4})
    >>> policy, table = plan_deferral(costs, batch=8, exit_rate=0.7, window=8, trials=20)
    >>> policy.min_waiting > 1, table[(1, 0)] > table[(policy.min_waiting, policy.max_wait)]
    (True, True)
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Measured costs (any unit, e.g. milliseconds) at one batch size.

    Attributes:
      shallow: one shallow step: layers [0, S), the exit head and the step's bookkeeping.
      deep: a deep pass (layers [S, L) and its exit head) at each static width.
    """

    shallow: float
    deep: dict[int, float]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What a simulated (or measured) run did.

    Attributes:
      cost_per_token: total cost over tokens produced.
      passes: deep passes per example-token (passes / tokens).
      served_per_pass: mean number of waiting examples a pass served.
      mean_wait, max_wait: shallow steps an example waited before its pass (mean over waits).
    """

    cost_per_token: float
    passes: float
    served_per_pass: float
    mean_wait: float
    max_wait: int


def _width(rows: int, widths: list[int]) -> int:
    """The narrowest static width covering `rows`."""
    return next(w for w in widths if w >= rows)


def simulate(
    min_waiting: int, max_wait: int, costs: StepCosts, *, batch: int, exit_rate: float,
    window: int, length: int = 64, trials: int = 50, seed: int = 0,
) -> Schedule:  # fmt: skip
    """Plain FREE's schedule under a policy, exits i.i.d. at `exit_rate`, every example producing
    `length` tokens (the decoder's loop: see `free.py`); `trials` batches run side by side."""
    rng = np.random.default_rng(seed)
    widths = np.asarray(sorted(costs.deep))
    deep_cost = np.asarray([costs.deep[w] for w in widths], float)
    shape = (trials, batch)
    pos, stack, waited = (np.zeros(shape, int) for _ in range(3))
    waiting = np.zeros(shape, bool)
    cost = np.zeros(trials)
    passes = served = wait_sum = wait_max = 0
    while (pos < length).any():
        active = pos < length
        running = active.any(axis=1)  # trials still decoding
        exits = rng.random(shape) < exit_rate
        need = active & (waiting | ~exits | (stack + 1 >= window))
        n_need = need.sum(axis=1)
        trigger = (n_need > 0) & (
            (n_need >= min_waiting) | (np.where(need, waited, -1).max(axis=1) >= max_wait)
            | (n_need == active.sum(axis=1))
        )  # fmt: skip
        rows = np.where(active, stack + 1, 0).max(axis=1)
        width_index = np.searchsorted(widths, rows, side="left").clip(0, len(widths) - 1)
        cost += running * costs.shallow + trigger * deep_cost[width_index]
        passes += int(trigger.sum())
        t_need = need & trigger[:, None]
        served += int(t_need.sum())
        wait_sum += int(waited[t_need].sum())
        wait_max = max(wait_max, int(waited[t_need].max(initial=0)))
        hold = ~trigger[:, None]
        advance = np.where(hold, active & ~need, active)
        pos += advance
        stack = np.where(hold, stack + advance, 0)
        waiting = np.where(hold, waiting | need, False)
        waited = np.where(hold, waited + need, 0)
    tokens = trials * batch * length
    return Schedule(
        cost_per_token=float(cost.sum()) / tokens, passes=passes / tokens,
        served_per_pass=served / max(passes, 1), mean_wait=wait_sum / max(served, 1),
        max_wait=wait_max,
    )  # fmt: skip


def plan_deferral(
    costs: StepCosts, *, batch: int, exit_rate: float, window: int, length: int = 64,
    max_waits: tuple[int, ...] = (1, 2, 4, 8, 16, 64), trials: int = 50, seed: int = 0,
    min_gain: float = 1.1,
) -> tuple[DeferralPolicy, dict[tuple[int, int], float]]:  # fmt: skip
    """The (min_waiting, max_wait) with the lowest simulated cost per token, and the whole table
    {(min_waiting, max_wait): cost per token}, (1, 0) (no deferral) included. Ties go to the
    smaller deferral, and a policy must beat no deferral by `min_gain` in the simulation: on the
    2-core CPU the simulation predicted 1.04x for a policy that measured 0.82x of plain FREE
    (t5-small shape, batch 8; exits are not independent and a waiting step costs a full shallow
    step), so small predicted gains are not trusted."""
    if not 0.0 <= exit_rate <= 1.0:
        raise ValueError(f"exit_rate must be in [0, 1], got {exit_rate}")
    if batch < 1 or window < 1 or not costs.deep or max(costs.deep) < window:
        raise ValueError(
            f"plan_deferral: batch and window must be >= 1 and costs.deep must cover the window "
            f"{window}; got batch {batch}, widths {sorted(costs.deep)}"
        )
    table = {}
    for k in range(1, batch + 1):
        for wait in max_waits if k > 1 else (0,):  # with k = 1 nobody ever waits
            table[(k, wait)] = simulate(
                k, wait, costs, batch=batch, exit_rate=exit_rate, window=window, length=length,
                trials=trials, seed=seed,
            ).cost_per_token  # fmt: skip
    best = min(table, key=lambda kw: (round(table[kw], 12), kw))
    if table[(1, 0)] < min_gain * table[best]:
        best = (1, 0)
    return DeferralPolicy(*best), table


@dataclasses.dataclass(frozen=True)
class DeferralPolicy:
    """Run the deep pass when >= `min_waiting` examples wait, or one has waited `max_wait` steps,
    or every unfinished example waits. (1, 0): no deferral (FREE as published)."""

    min_waiting: int = 1
    max_wait: int = 0
