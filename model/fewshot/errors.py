"""Errors of the few-shot reference: a malformed bank, or one built for another detector."""

from __future__ import annotations


class ReferenceError(ValueError):  # noqa: A001 - the contract's name; shadows only weakref's builtin here
    """A reference bank (or the good images it is built from) cannot be used: malformed bytes,
    too few images, inconsistent tensors."""


class ReferenceMismatchError(ReferenceError):
    """A well-formed bank built with another detector, backbone, weights, input size, layers or
    prompt checkpoint than the running one: its patch tokens and thresholds would not mean the
    same thing, so it is refused instead of being mixed in silently."""
