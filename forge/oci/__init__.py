"""Daemonless OCI images: reproducible tar layers, the on-disk image layout, image assembly, and a
registry client (OCI distribution push/pull with Basic and Bearer auth).

No Docker engine is involved: layers are plain tars written by `forge.oci.layers`, images are JSON
written by `forge.oci.image` into an OCI image layout (`forge.oci.layout`), and `forge.oci.registry`
speaks the distribution API directly. `skopeo` and `umoci` read what these modules write.

The names below load their module on first use (PEP 562 `__getattr__`), as `forge.loadgen`'s do:
a build whose every stage is cached reads `forge.oci.layers.source_date_epoch` for image labels and
must not import the registry client (http.client, ssl, email) to do so.
"""

from __future__ import annotations

from forge.lazy import lazy_exports

_EXPORTS = {
    "ImageConfig": "image",
    "ImageResult": "image",
    "build_image": "image",
    "read_image": "image",
    "Layer": "layers",
    "source_date_epoch": "layers",
    "write_file_layer": "layers",
    "write_tree_layer": "layers",
    "Descriptor": "layout",
    "BUILD_REPORT_TYPE": "registry",
    "Credentials": "registry",
    "PushResult": "registry",
    "ReferrerResult": "registry",
    "RegistryOptions": "registry",
    "attach_referrer": "registry",
    "list_referrers": "registry",
    "parse_reference": "registry",
    "pull_image": "registry",
    "push_image": "registry",
    "resolve_credentials": "registry",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
