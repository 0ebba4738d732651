"""Exceptions of the msgd package, rooted in MsgdError."""

from __future__ import annotations


class MsgdError(Exception):
    """Base of every error msgd raises on purpose."""


class ConfigError(MsgdError):
    """The configuration cannot be used; msgd exits with code 2 before binding."""

    exit_code = 2


class TLSSetupError(MsgdError):
    """A certificate, key, CA or CRL is unusable."""


class RegistryError(MsgdError):
    """The registry could not make a change durable: STORAGE_FAILURE for that entry."""


class RegistryCorruptError(RegistryError):
    """The registry file failed its check at start; it is left untouched."""

    exit_code = 3


class ProvisioningError(MsgdError):
    """The provisioning file cannot be read or parsed; the old provisioning stays."""
