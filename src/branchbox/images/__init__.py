"""Templates: declarative specs, mmdebstrap builds, rootfs tar imports and a content-addressed cache."""

from branchbox.images.build import BuildEvent
from branchbox.images.spec import FileSpec, TemplateSpec, default_spec, load_spec
from branchbox.images.store import TemplateStore

__all__ = ["BuildEvent", "FileSpec", "TemplateSpec", "TemplateStore", "default_spec", "load_spec"]
