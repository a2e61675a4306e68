"""The three disjoint seed sets: training chains, validation (where every setting is chosen) and test
(where every reported number comes from).

A chain's noise comes from ``torch.Generator().manual_seed(seed)`` (:func:`ctrl.sampling.seeded_noise`),
and torch's CPU generator keeps only the LOW 32 BITS of a seed: 1, 2**32 + 1 and 2**40 + 1 draw the
same numbers. So the sets are disjoint ranges of 32-bit seeds, and every seed is checked against its
range rather than offset by a large constant:

    VALIDATION = [0, 2**30)      TEST = [2**30, 2**31)      TRAINING = [2**31, 2**32)

Draws that are not a chain's noise (an algorithm's minibatch order, a guided sampler's particles)
take :func:`derived_seed`, a salted hash into the training range, never a validation or test seed.
"""

from __future__ import annotations

import hashlib

VALIDATION = range(0, 1 << 30)
TEST = range(1 << 30, 1 << 31)
TRAINING = range(1 << 31, 1 << 32)
SETS = {"validation": VALIDATION, "test": TEST, "training": TRAINING}


def derived_seed(salt: str, *values: int) -> int:
    """A seed in the training range from ``salt`` and integers (a salted blake2b hash): reproducible, changes
    with any of them, and never a validation or test chain's seed."""
    payload = (salt + ":" + ",".join(str(int(v)) for v in values)).encode()
    digest = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")
    return TRAINING.start + digest % len(TRAINING)


def chain_seed(seed: int, epoch: int, index: int) -> int:
    """The noise seed of training chain ``index`` of ``epoch`` for the run seed ``seed``: a pure function of its
    position, so that a chain's rollout is the same whichever rank draws it and after a resume."""
    return derived_seed("training chain", seed, epoch, index)


def run_seed_args(seed: int) -> list[str]:
    """The command-line settings that make ``seed`` a run's seed: ``seed_everything`` seeds the weights'
    initialisation, ``data.seed`` the training chains' noise and the algorithm's draws (seed_everything alone
    leaves those at the config's ``data.seed``)."""
    return ["--seed_everything", str(seed), "--data.seed", str(seed)]


def check_seeds(setting: str, first: int, count: int, kind: str) -> None:
    """Refuse ``count`` consecutive seeds from ``first`` (given as ``setting``) that leave the ``kind`` range."""
    allowed = SETS[kind]
    if first < allowed.start or first + count > allowed.stop:
        others = ", ".join(f"{name} [{r.start}, {r.stop})" for name, r in SETS.items() if name != kind)
        raise ValueError(
            f"{setting}={first} gives {kind} seeds [{first}, {first + count}) outside the {kind} range "
            f"[{allowed.start}, {allowed.stop}); the seed sets must stay disjoint ({others}): "
            f"choose {setting} in [{allowed.start}, {allowed.stop - count}], or leave it unset."
        )
