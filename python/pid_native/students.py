"""The released PiD students, and which one a checkpoint file is.

A student is a latent space and a variant of upstream's release (nv-tlabs/PiD @2c8814c,
``docs/checkpoints.md`` and ``inference/checkpoint_registry.py``):

- ``2k``: decoders trained at 2048 px (512 -> 2048), v1 network;
- ``2kto4k``: v1 decoders trained from 2K to 4K (1024 -> 4096);
- ``2kto4k_v1pt5``: the v1.5 network (pid_spec §10.2) trained from 2K to 4K.

Each is published as ``checkpoints/<experiment>/model_ema_bf16.pth`` in the Hugging Face
repository ``nvidia/PiD``, the experiment being upstream's job name. A checkpoint file says
which student it is through its name (that directory, a ``pid_<space>_<variant>`` file name,
or the ``pid_student`` metadata ``pid-native convert`` writes) and its tensors (the adapter's
latent channels, v1 or v1.5); :func:`identify` combines both with what the caller says.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from . import _native
from .errors import InvalidInputError, WeightsError
from .latents import REFUSED_SPACES, LatentSpace, latent_space

Variant = Literal["2k", "2kto4k", "2kto4k_v1pt5"]
VARIANTS: tuple[str, ...] = ("2k", "2kto4k", "2kto4k_v1pt5")
HUB_REPO = "nvidia/PiD"
HUB_FILE = "model_ema_bf16.pth"


class Student(BaseModel):
    """One released PiD student.

    Attributes:
        name: ``<space>-<variant>``, e.g. ``flux-2kto4k_v1pt5``.
        space: canonical latent space.
        variant: ``2k``, ``2kto4k`` or ``2kto4k_v1pt5``.
        experiment: upstream's job name, the checkpoint's directory in ``nvidia/PiD``.
        v15: the v1.5 network (else v1).
        unpatchify: the adapter's 2x2 channel un-packing (flux2 v1.5), else 1.
        hub: published in ``nvidia/PiD`` per upstream's registry (``pid-native fetch`` gets it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    space: str
    variant: Variant
    experiment: str
    v15: bool
    unpatchify: int = 1
    hub: bool = True

    @property
    def latent(self) -> LatentSpace:
        return latent_space(self.space)

    @property
    def hub_file(self) -> str:
        """The checkpoint's path in ``nvidia/PiD``."""
        return f"checkpoints/{self.experiment}/{HUB_FILE}"

    @property
    def adapter_channels(self) -> int:
        """Input channels of the adapter's first conv (what the tensors show)."""
        return self.latent.channels // (self.unpatchify * self.unpatchify)

    def config(self, shrunk: bool = False) -> str:
        """The student's network configuration (JSON, upstream names); ``shrunk``: its mini
        version, the backbone of the mini goldens (test mirrors and synthetic bundles)."""
        s = self.latent
        return _native.released_config(s.channels, s.down_factor, self.unpatchify, self.v15, shrunk)

    def describe(self) -> str:
        return f"{self.name} ({'v1.5' if self.v15 else 'v1'}, {self.space} latents)"


def _student(space: str, variant: Variant, experiment: str, **kw: object) -> Student:
    return Student(name=f"{space}-{variant}", space=space, variant=variant, experiment=experiment, **kw)


_V1, _V15 = "PiD_res{}_sr4x_official_{}_distill_4step", "PiD_v1pt5_res{}_sr4x_official_{}_distill_4step"

STUDENTS: tuple[Student, ...] = (
    _student("flux", "2k", _V1.format("2k", "flux"), v15=False),
    _student("flux", "2kto4k_v1pt5", _V15.format("2kto4k", "flux"), v15=True),
    _student("flux2", "2k", _V1.format("2k", "flux2"), v15=False),
    _student("flux2", "2kto4k_v1pt5", _V15.format("2kto4k", "flux2"), v15=True, unpatchify=2),
    _student("sd3", "2k", _V1.format("2k", "sd3"), v15=False),
    _student("sd3", "2kto4k", _V1.format("2kto4k", "sd3"), v15=False),
    _student("sdxl", "2kto4k", _V1.format("2kto4k", "sdxl"), v15=False),
    _student("qwenimage", "2kto4k_v1pt5", _V15.format("2kto4k", "qwenimage"), v15=True),
    # The v1 Qwen-Image 2kto4k student of the June 2026 release, since replaced by v1.5 in
    # upstream's registry (SceneWorks' pid-qwenimage converted it): decoded when given, not fetched.
    _student("qwenimage", "2kto4k", _V1.format("2kto4k", "qwenimage"), v15=False, hub=False),
)

# The student ``pid-native fetch --space <space>`` provisions: the 4K decoder of each space
# (1024-pixel latents to 4096), which is what pid-native's 4x upscaling is for. The ``2k``
# students are sharper at 2048 px (upstream README).
DEFAULT_VARIANT: dict[str, Variant] = {
    "sdxl": "2kto4k",
    "flux": "2kto4k_v1pt5",
    "flux2": "2kto4k_v1pt5",
    "qwenimage": "2kto4k_v1pt5",
    "sd3": "2kto4k",
}

# Checkpoints refused by name, with why.
DEPRECATED: dict[str, str] = {
    name: "the FLUX.2 v1 2kto4k student is deprecated upstream (docs/FLUX2_2kto4k_new_ckpt_compare.md: "
    '"*_2606* checkpoint for FLUX.2 is deprecated. Please use the new 2kto4k_v1pt5 checkpoint"; the one '
    "before it had a colour-drift bug); use flux2-2kto4k_v1pt5 (pid-native fetch --space flux2)"
    for name in (
        "PiD_res2kto4k_sr4x_official_flux2_distill_4step",
        "PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606",
        "flux2-2kto4k",
    )
}
OUT_OF_REACH: dict[str, str] = {
    "PiD_res2k_sr4x_official_dinov2_distill_4step": REFUSED_SPACES["dinov2"],
    "PiD_res2k_sr8x_official_siglip_distill_4step": REFUSED_SPACES["siglip"],
    "dinov2-2k": REFUSED_SPACES["dinov2"],
    "siglip-2k": REFUSED_SPACES["siglip"],
}
# Adapter input channels of the out-of-reach students (DINOv2-B tokens, SigLIP-2 So400M tokens).
_OUT_OF_REACH_CHANNELS = {768: REFUSED_SPACES["dinov2"], 1152: REFUSED_SPACES["siglip"]}

# `pid_<space>_<variant>[.safetensors]`: SceneWorks' names for converted students (prior art §3.4).
_CONVERTED_NAME = re.compile(r"pid_(?P<space>[a-z0-9]+)_(?P<variant>2k|2kto4k|2kto4k_v1pt5)")


_DEPRECATED = {k.lower(): v for k, v in DEPRECATED.items()}
_OUT_OF_REACH = {k.lower(): v for k, v in OUT_OF_REACH.items()}


def _refuse(name: str) -> None:
    key = name.lower()
    if key in _DEPRECATED:
        raise WeightsError(f"{name}: {_DEPRECATED[key]}", "deprecated_student")
    if key in _OUT_OF_REACH:
        raise InvalidInputError(f"{name}: {_OUT_OF_REACH[key]}", "unsupported_space")


def student(name: str) -> Student:
    """A student by name, ``<space>-<variant>``, where the space may be any alias
    (``zimage-turbo-2k`` is ``flux-2k``).

    Raises:
        InvalidInputError: unknown (``unknown_student``, listing the known ones) or out-of-reach
            (``unsupported_space``) student. WeightsError: a deprecated one (``deprecated_student``).
    """
    key = name.strip().lower()
    _refuse(key)
    for variant in sorted(VARIANTS, key=len, reverse=True):
        if key.endswith(f"-{variant}"):
            canonical = latent_space(key[: -len(variant) - 1]).name
            _refuse(f"{canonical}-{variant}")
            for s in STUDENTS:
                if (s.space, s.variant) == (canonical, variant):
                    return s
    known = ", ".join(s.name for s in STUDENTS)
    raise InvalidInputError(f"unknown PiD student {name!r}; known: {known}", "unknown_student")


def default_student(space: str) -> Student:
    """The student provisioned for a space by default (see :data:`DEFAULT_VARIANT`)."""
    canonical = latent_space(space).name
    return student(f"{canonical}-{DEFAULT_VARIANT[canonical]}")


def file_claims(path: str | os.PathLike[str]) -> tuple[Student | None, str | None]:
    """The student and space a checkpoint's name says it is: the ``pid_student`` / ``pid_space``
    metadata ``pid-native convert`` writes, else upstream's experiment directory in its path,
    else a ``pid_<space>_<variant>`` file name. ``(None, None)`` when it says nothing.

    Raises:
        WeightsError, InvalidInputError: the name is a deprecated or out-of-reach student.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        _native.check_safetensors([str(path)])  # a damaged file is named by the core, not safetensors
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        if meta.get("pid_student"):
            found = student(meta["pid_student"])
            return found, found.space
        if meta.get("pid_space"):
            return None, latent_space(meta["pid_space"]).name
    for part in reversed(path.parts):
        _refuse(part)
        match = next((s for s in STUDENTS if s.experiment == part), None)
        if match is not None:
            return match, match.space
    m = _CONVERTED_NAME.fullmatch(path.stem)
    if m is not None:
        found = student(f"{m['space']}-{m['variant']}")
        return found, found.space
    return None, None


class Identity(BaseModel):
    """What :func:`identify` concluded about a checkpoint.

    Attributes:
        space: the latent space it decodes.
        student: the released student, or None when its tensors and name leave the variant
            open (a bare ``sd3`` v1 file could be ``2k`` or ``2kto4k``: the same network).
    """

    model_config = ConfigDict(frozen=True)

    space: LatentSpace
    student: Student | None


def identify(
    path: str | os.PathLike[str], *, space: str | None = None, student_name: str | None = None
) -> Identity:
    """Which student a checkpoint is, from its tensors, its name, and what the caller says.

    The tensors give the adapter's input channels and the network generation (v1 or v1.5);
    the name (see :func:`file_claims`) and the caller's ``student_name`` or ``space`` must
    agree with them and with each other.

    Raises:
        InvalidInputError: ``wrong_space`` (a checkpoint of another space), ``wrong_student``,
            ``ambiguous_space`` (a 16-channel file whose name does not say flux, sd3 or
            qwenimage: pass ``space``), ``unsupported_space``, ``unknown_student``.
        WeightsError: ``inconsistent_checkpoint`` (its name and tensors disagree),
            ``deprecated_student``, ``not_a_student``, and the core's checks of the file.
    """
    asked = student(student_name) if student_name else None
    asked_space = latent_space(space) if space else None
    if asked and asked_space and asked.space != asked_space.name:
        raise InvalidInputError(
            f"student {asked.name} decodes {asked.space} latents, not {asked_space.name}; pass one of them",
            "wrong_student",
        )
    named, named_space = file_claims(path)
    facts = json.loads(_native.inspect_checkpoint(str(path)))
    channels, v15 = facts["lq_latent_channels"], facts["pit_lq_inject"]
    if channels in _OUT_OF_REACH_CHANNELS:
        raise InvalidInputError(f"{path}: {_OUT_OF_REACH_CHANNELS[channels]}", "unsupported_space")
    fits = [s for s in STUDENTS if s.adapter_channels == channels and s.v15 == v15]
    what = f"a {'v1.5' if v15 else 'v1'} network whose adapter takes {channels}-channel latents"
    if not fits:
        raise WeightsError(f"{path}: {what}, which no released PiD student is", "not_a_student")
    for claim, source, code, error in (
        (named, "its name says", "inconsistent_checkpoint", WeightsError),
        (asked, "you asked for", "wrong_student", InvalidInputError),
    ):
        if claim is not None and claim not in fits:
            raise error(
                f"{path}: {source} {claim.describe()}, but its tensors are {what} "
                f"({' or '.join(s.name for s in fits)})",
                code,
            )
    chosen = asked or named
    if asked and named and asked != named:
        raise InvalidInputError(
            f"{path}: you asked for {asked.name}, but its name says {named.name}", "wrong_student"
        )
    if asked_space is None and named_space is not None:
        asked_space = latent_space(named_space)
    elif asked_space is not None and named_space not in (None, asked_space.name):
        raise InvalidInputError(
            f"{path} is a {named_space} checkpoint (from its name), not a {asked_space.name} one: pass "
            f"space={named_space!r} (--space {named_space}) or a {asked_space.name} checkpoint",
            "wrong_space",
        )
    if asked_space is not None:
        if chosen is not None and chosen.space != asked_space.name:
            raise InvalidInputError(
                f"{path} is the {chosen.describe()} checkpoint (from its name), "
                f"not a {asked_space.name} one: pass space={chosen.space!r} (--space {chosen.space}) "
                f"or a {asked_space.name} checkpoint",
                "wrong_space",
            )
        fits = [s for s in fits if s.space == asked_space.name]
        if not fits:
            raise InvalidInputError(
                f"{path} is {what}, so it cannot decode {asked_space.name} latents "
                f"({asked_space.channels} channels): it is a checkpoint of another space",
                "wrong_space",
            )
    if chosen is not None:
        return Identity(space=chosen.latent, student=chosen)
    spaces = sorted({s.space for s in fits})
    if len(spaces) > 1:
        raise InvalidInputError(
            f"{path} is {what}, which the {', '.join(spaces)} students all are, and its name does not say "
            f"which: pass space= (--space) or student= (--student)",
            "ambiguous_space",
        )
    return Identity(space=latent_space(spaces[0]), student=fits[0] if len(fits) == 1 else None)


__all__ = [
    "DEFAULT_VARIANT",
    "DEPRECATED",
    "HUB_FILE",
    "HUB_REPO",
    "STUDENTS",
    "VARIANTS",
    "Identity",
    "Student",
    "default_student",
    "file_claims",
    "identify",
    "student",
]
