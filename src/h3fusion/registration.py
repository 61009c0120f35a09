"""The fused model's registration with transformers' Auto classes, done when transformers loads them.

``import h3fusion`` promises that ``AutoModelForCausalLM.from_pretrained(<run>/fused)`` then works
without ``trust_remote_code``. Registering needs the model class, hence torch and transformers (~5 s),
which ``h3fusion --help`` and ``import h3fusion.data`` should not pay for. So importing the package
only installs an import hook: right after transformers' ``configuration_auto`` (``AutoConfig``) or
``modeling_auto`` (``AutoModel*``) module has run, it imports ours, which register themselves. When
those modules are already loaded, ours are imported at once. The config goes on its own
(``moe.configuration``) because ``configuration_auto`` loads while transformers' modeling code is
still importing, so the model class cannot be built at that moment.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

# transformers module -> our module that registers with it when imported
REGISTRARS = {
    "transformers.models.auto.configuration_auto": "h3fusion.moe.configuration",
    "transformers.models.auto.modeling_auto": "h3fusion.moe.modeling",
}


class _RegisterAfter(importlib.abc.Loader):
    """Runs a module with its own loader, then imports our registrar for it."""

    def __init__(self, loader: importlib.abc.Loader, registrar: str):
        self.loader, self.registrar = loader, registrar

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        importlib.import_module(self.registrar)

    def __getattr__(self, name: str):  # get_source, get_filename ...: the real loader's (inspect, tracebacks)
        return getattr(self.loader, name)


class _AutoClassesHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        registrar = REGISTRARS.get(name)
        if registrar is None:
            return None
        for finder in sys.meta_path:  # the finder that would have found it without us
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfter(spec.loader, registrar)
                return spec
        return None


def register_with_auto_classes() -> None:
    """Register now where transformers has loaded the Auto module, else as soon as it does (idempotent)."""
    if not any(isinstance(finder, _AutoClassesHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoClassesHook())
    for auto_module, registrar in REGISTRARS.items():
        if auto_module in sys.modules:
            importlib.import_module(registrar)
