"""A PiD checkpoint as lossless safetensors (``pid-native convert``).

Upstream publishes each student as ``model_ema_bf16.pth``. pid-native reads that file as it is
(without pickle, see ``rust/pid-core/src/pth.rs``); converting it once gives a file that is
memory-mapped at load and read by any safetensors tool. The conversion is upstream's
inference transform (``net.X`` is ``X``; ``net_ema.*``, ``fake_score.*`` and
``discriminator.*`` are dropped), checked against the exact tensor set of the student's
network, with every tensor written byte for byte (same dtype, same shape). The file's
metadata records the student, so it identifies itself whatever it is named.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import _native
from .errors import InvalidInputError
from .students import identify


def convert(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    space: str | None = None,
    student: str | None = None,
) -> tuple[Path, str]:
    """Write ``checkpoint`` (``.pth`` or ``.safetensors``) as the safetensors file ``output``.

    Args:
        checkpoint: the PiD checkpoint.
        output: the ``.safetensors`` file to write (atomically: a temporary name, then renamed).
        space, student: what the checkpoint is, where its name and tensors do not say it
            (see :func:`pid_native.students.identify`).

    Returns:
        ``(output, what)``: the written file and the student (or space) it holds.

    Raises:
        InvalidInputError: ``output`` is not a ``.safetensors`` path or is the input; the
            identification errors of :func:`~pid_native.students.identify`.
        WeightsError: the checkpoint is not a student (a ``.pth`` holding anything but
            tensors, a missing or unexpected tensor, a deprecated student, ...).
    """
    src, out = Path(checkpoint), Path(output)
    if out.suffix != ".safetensors":
        raise InvalidInputError(f"the output must be a .safetensors file, got {out}", "output_path")
    if out.exists() and out.resolve() == src.resolve():
        raise InvalidInputError(f"the output {out} is the checkpoint itself", "output_path")
    found = identify(src, space=space, student_name=student)
    metadata = {
        "format": "pt",
        "pid_space": found.space.name,
        "pid_source": "/".join(src.resolve().parts[-2:]),
        "pid_native": _native.__version__,
    }
    if found.student is not None:
        metadata["pid_student"] = found.student.name
    _native.convert_checkpoint(
        str(src), str(out), metadata, None, found.space.channels, found.space.down_factor
    )
    return out, found.student.name if found.student else found.space.name


__all__ = ["convert"]
