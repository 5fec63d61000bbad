"""The batch job of :mod:`pid_native.batch` on a Ray cluster (``pip install "pid-native[ray]"``).

Ray Data distributes the work: :func:`dataset` makes a dataset of :class:`~pid_native.batch.Item`\\ s
(one block per decode batch), and :class:`DecodeBatches`, a callable class for
``Dataset.map_batches``, opens one :class:`~pid_native.Decoder` per actor and runs
:func:`pid_native.batch.run` on each batch, so skipping complete outputs, atomic writes and
per-item failures behave exactly as on one machine. :func:`run` does both and yields the
:class:`~pid_native.batch.ItemResult`\\ s as batches finish::

    import ray
    from pid_native import batch, ray as pid_ray

    items = batch.collect(["latents/"], Path("out"), "decode", caption="a red fox")
    ds = pid_ray.dataset(items).map_batches(
        pid_ray.DecodeBatches,
        fn_constructor_kwargs={"weights": "/path/to/bundle", "mode": "decode"},
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=4,  # or num_gpus=1: one GPU per actor
    )
    results = [pid_ray.result(row) for row in ds.iter_rows()]

Inputs and outputs are paths, so every node must see them at the same place (one machine, or
a shared filesystem). Every decoded image is research/evaluation-only (NVIDIA License, NSCLv1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .batch import DEFAULT_BATCH_SIZE, Item, ItemResult, Mode, RawLatents
from .batch import run as run_local
from .errors import InvalidInputError, MissingDependencyError, PidError

try:
    import ray
    import ray.data
except ImportError as exc:
    raise MissingDependencyError(
        f"pid_native.ray needs Ray Data ({exc}); install it with: pip install 'pid-native[ray]'",
        "ray_missing",
    ) from exc

ITEM_COLUMN = "item"
RESULT_COLUMN = "result"


def dataset(items: Sequence[Item], batch_size: int = DEFAULT_BATCH_SIZE) -> ray.data.Dataset:
    """``items`` as a Ray dataset of JSON rows, ``batch_size`` items per block.

    Blocks are what Ray hands to actors, so one block per decode batch lets an idle actor take
    the next batch while the others work.
    """
    rows = [{ITEM_COLUMN: item.model_dump_json()} for item in items]
    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))


def result(row: dict[str, Any]) -> ItemResult:
    """The :class:`~pid_native.batch.ItemResult` of one output row of :class:`DecodeBatches`."""
    return ItemResult.from_json(json.loads(row[RESULT_COLUMN]))


class DecodeBatches:
    """A callable class for ``ray.data.Dataset.map_batches``: one Decoder per actor.

    Each call decodes (or upscales) one batch of :func:`dataset` rows with
    :func:`pid_native.batch.run` and returns one ``result`` row (JSON) per item. Item failures
    are results, never exceptions, so one bad file does not stop the dataset.
    """

    def __init__(
        self,
        weights: str,
        *,
        mode: Mode = "decode",
        steps: int = 4,
        overwrite: bool = False,
        raw: RawLatents | None = None,
        **open_kwargs: Any,
    ) -> None:
        """Open the actor's decoder.

        Args:
            weights: bundle directory or PiD checkpoint, at the same path on every node.
            mode: ``decode`` (latent files) or ``upscale`` (images).
            steps: sampler steps, 1-4.
            overwrite: redo items whose outputs already exist.
            raw: the latent files hold raw VAE latents (see :class:`pid_native.batch.RawLatents`).
            **open_kwargs: forwarded to :meth:`pid_native.Decoder.open` (backend, device, gemma,
                vae, memory_budget, space, ...).
        """
        # The engine's thread pool would otherwise take every core of the node, however many
        # CPUs Ray gave this actor; it reads the variable when it first runs. (Outside an actor,
        # in a driver, nothing was assigned.)
        context = ray.get_runtime_context()
        cpus = context.get_assigned_resources().get("CPU") if context.get_actor_id() else None
        if cpus:
            os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, int(cpus))))
        from .decoder import Decoder

        try:
            self.decoder: Decoder | PidError = Decoder.open(weights, **open_kwargs)
        except PidError as exc:
            # Each of this actor's items then fails with the reason, in the report, rather than
            # Ray retrying the actor and ending the whole job with a traceback.
            self.decoder = exc
        self.mode: Mode = mode
        self.steps = steps
        self.overwrite = overwrite
        self.raw = raw

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [Item.model_validate_json(row) for row in batch[ITEM_COLUMN]]
        if isinstance(self.decoder, PidError):
            results: Iterable[ItemResult] = [ItemResult.failure(item, self.decoder) for item in items]
        else:
            results = run_local(
                self.decoder,
                items,
                self.mode,
                steps=self.steps,
                batch_size=len(items),
                overwrite=self.overwrite,
                raw=self.raw,
            )
        return {RESULT_COLUMN: np.array([json.dumps(r.to_json()) for r in results], dtype=object)}


def run(
    items: Sequence[Item],
    weights: str | os.PathLike[str],
    mode: Mode = "decode",
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    steps: int = 4,
    overwrite: bool = False,
    raw: RawLatents | None = None,
    **open_kwargs: Any,
) -> Iterator[ItemResult]:
    """:func:`pid_native.batch.run` on a Ray cluster, yielding results as batches finish.

    Args:
        items: from :func:`pid_native.batch.collect`; paths must be visible on every node.
        weights: bundle directory or PiD checkpoint, at the same path on every node.
        mode: ``decode`` or ``upscale``.
        address: the cluster (``auto``, ``ray://host:10001``); None joins the cluster this process
            is connected to, or ``RAY_ADDRESS``'s, or starts a local one.
        workers: actors, each with its own decoder; default: as many as the cluster's CPUs (or
            GPUs when ``gpus_per_worker`` is set) allow.
        cpus_per_worker, gpus_per_worker: Ray resources each actor reserves.
        batch_size, steps, overwrite, raw: as for :func:`pid_native.batch.run`.
        **open_kwargs: forwarded to :meth:`pid_native.Decoder.open` in every actor.
    """
    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    if workers is None:
        resources = ray.cluster_resources()
        kind, each = ("GPU", gpus_per_worker) if gpus_per_worker else ("CPU", cpus_per_worker)
        workers = int(resources.get(kind, 0) // each)
        if workers < 1:
            raise InvalidInputError(
                f"the Ray cluster has {resources.get(kind, 0):g} {kind}(s), not enough for one worker "
                f"with {each:g}; ask for fewer per worker or add nodes",
                "ray_resources",
            )
    out = dataset(items, batch_size).map_batches(
        DecodeBatches,
        fn_constructor_kwargs={
            "weights": str(Path(weights).absolute()),
            "mode": mode,
            "steps": steps,
            "overwrite": overwrite,
            "raw": raw,
            **open_kwargs,
        },
        # One batch in flight per actor: an actor still loading its decoder queues nothing.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker,
    )
    # Results stream back per item (the CLI draws its own bar over them), so Ray's bars are noise.
    out.context.enable_progress_bars = False
    out.context.print_on_execution_start = False
    for row in out.iter_rows():
        yield result(row)


__all__ = ["DecodeBatches", "dataset", "result", "run"]
