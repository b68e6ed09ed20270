"""Daemonless OCI images: reproducible tar layers, the on-disk image layout, image assembly, and a
registry client (OCI distribution push/pull with Basic and Bearer auth).

No Docker engine is involved: layers are plain tars written by `forge.oci.layers`, images are JSON
written by `forge.oci.image` into an OCI image layout (`forge.oci.layout`), and `forge.oci.registry`
speaks the distribution API directly. `skopeo` and `umoci` read what these modules write.
"""

from __future__ import annotations

from forge.oci.image import ImageConfig, ImageResult, build_image, read_image
from forge.oci.layers import Layer, source_date_epoch, write_file_layer, write_tree_layer
from forge.oci.layout import Descriptor
from forge.oci.registry import (
    BUILD_REPORT_TYPE,
    Credentials,
    PushResult,
    ReferrerResult,
    RegistryOptions,
    attach_referrer,
    list_referrers,
    parse_reference,
    pull_image,
    push_image,
    resolve_credentials,
)

__all__ = [
    "BUILD_REPORT_TYPE",
    "Credentials",
    "Descriptor",
    "ImageConfig",
    "ImageResult",
    "Layer",
    "RegistryOptions",
    "PushResult",
    "ReferrerResult",
    "attach_referrer",
    "build_image",
    "list_referrers",
    "parse_reference",
    "pull_image",
    "push_image",
    "read_image",
    "resolve_credentials",
    "source_date_epoch",
    "write_file_layer",
    "write_tree_layer",
]
