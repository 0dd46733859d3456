"""The schema is the only place defaults live (issue 23): no typed section or settings object has a
default of its own, and no library function repeats a schema key's default as a keyword default."""

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import mpqflow
from mpqflow import config as config_module
from mpqflow.methods import METHODS
from mpqflow.quant.scheme import QuantScheme
from mpqflow.validation import SCHEMA_PATH, _schema, schema_defaults


def _leaf_defaults(node, out):
    """{key name: {defaults}} of every property with a default, anywhere in the schema."""
    if isinstance(node, dict):
        for name, sub in (node.get("properties") or {}).items():
            if isinstance(sub, dict) and "default" in sub and not isinstance(sub["default"], (dict, list)):
                out.setdefault(name, set()).add(repr(sub["default"]))
        for value in node.values():
            _leaf_defaults(value, out)
    elif isinstance(node, list):
        for value in node:
            _leaf_defaults(value, out)
    return out


SCHEMA_DEFAULTS = _leaf_defaults(_schema(), {})
# hawq_<x> keys reach the estimator as HawqConfig fields and hutchinson_traces' <x> arguments
SCHEMA_DEFAULTS.update({k.removeprefix("hawq_"): v for k, v in SCHEMA_DEFAULTS.items() if k.startswith("hawq_")})


def _sections():
    classes = {
        obj
        for obj in vars(config_module).values()
        if inspect.isclass(obj) and issubclass(obj, config_module.Section) and obj is not config_module.Section
    }
    classes |= {m.settings for m in METHODS.values() if m.settings is not None}
    return sorted(classes | {QuantScheme}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _sections(), ids=lambda c: c.__name__)
def test_sections_have_no_defaults(cls):
    """Built with no arguments, every section fails: each field must come from a validated config."""
    with_default = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == [], f"{cls.__name__} has defaults for {with_default}: they belong in {SCHEMA_PATH.name}"
    with pytest.raises(TypeError):
        cls()


# The layers that receive configuration: the stages (typed sections in), the method registry, the
# estimators, the study and the reports' figures. The functional core below them (quant.functional, observers, the comm
# codecs, optimize's back-ends, plotting helpers) keeps torch.ao-style argument defaults of its own API;
# what the workflow runs always passes every configured value explicitly.
CONFIG_FACING = (
    *("mpqflow.stages", "mpqflow.methods", "mpqflow.sensitivity", "mpqflow.config"),
    *("mpqflow.study", "mpqflow.study_plots", "mpqflow.ptq_study", "mpqflow.finetune_study", "mpqflow.gradquant_study"),
)


def _functions():
    for info in pkgutil.walk_packages(mpqflow.__path__, "mpqflow."):
        if not info.name.startswith(CONFIG_FACING):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != info.name:
                continue
            if inspect.isfunction(obj):
                yield f"{info.name}.{name}", obj
            elif inspect.isclass(obj):
                for attr, fn in vars(obj).items():
                    fn = getattr(fn, "__func__", fn)
                    if inspect.isfunction(fn):
                        yield f"{info.name}.{name}.{attr}", fn


def test_no_function_repeats_a_schema_default():
    """A keyword default with a schema key's name and that key's default value is a second home of it
    (None, meaning 'not given', is no value)."""
    repeated = []
    for where, fn in _functions():
        for p in inspect.signature(fn).parameters.values():
            if p.default is inspect.Parameter.empty or p.default is None or p.name not in SCHEMA_DEFAULTS:
                continue
            if repr(p.default) in SCHEMA_DEFAULTS[p.name]:
                repeated.append(f"{where}({p.name}={p.default!r})")
    assert repeated == [], "schema defaults repeated in the library: " + ", ".join(repeated)


def test_scheme_defaults_are_the_schemas():
    """A scheme built from a partial dict takes the schema's defaults, as the validated config does."""
    defaults = schema_defaults("$defs/scheme")
    scheme = QuantScheme.of(granularity="per_channel").to_dict()
    assert {k: scheme[k] for k in defaults if k != "granularity"} == {
        k: v for k, v in defaults.items() if k != "granularity"
    }
    assert scheme["granularity"] == "per_channel"
