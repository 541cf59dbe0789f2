"""Model families. Every module here registers its builders on import, so a new family is one new file."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
