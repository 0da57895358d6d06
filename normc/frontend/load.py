"""Loading models safely.

A model file is data: nothing here executes code from a model file unless the user
passed ``allow_pickle=True``. Accepted sources:

  zoo:NAME                      a built-in model (see ``normc.frontend.zoo``)
  path/to/file.py:function      a factory in a Python file (the user's own code)
  package.module:function       a factory in an importable module
  model.pt2                     a torch.export ExportedProgram (torch.export.save)
  model.pt / model.pth          a pickled whole nn.Module: refused unless allow_pickle
  path/to/dir/                  a Hugging Face directory (config.json + safetensors), see
                                ``normc.frontend.hf``

A factory returns an ``nn.Module`` or ``(module, example_inputs)`` where
``example_inputs`` is a tensor, a tuple/list of tensors (positional arguments) or a
dict of tensors (keyword arguments).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from normc.errors import NormcError
from normc.frontend.specs import (
    InputSpec,
    LoadedModel,
    forward_arg_names,
    sample_examples,
    set_eval,
    specs_from_examples,
)
from normc.frontend.zoo import load_zoo

ACCEPTED_FORMS = (
    "`zoo:NAME`, `path/to/file.py:function`, `package.module:function`, "
    "`model.pt2` (torch.export), a Hugging Face directory (config.json + safetensors), "
    "or `model.pt` with --allow-pickle"
)
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
_WEIGHT_SUFFIXES = (".safetensors",)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def load_model(
    source: str | os.PathLike,
    *,
    weights: str | None = None,
    allow_pickle: bool = False,
    input_specs: list[InputSpec] | None = None,
    example_args: tuple | None = None,
    task: str | None = None,
    trust_remote_code: bool = False,
    batch: int | None = None,
    seq_len: int | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """Load ``source`` into an eval-mode module with example inputs.

    ``weights``: a ``.safetensors`` file or a state-dict file (loaded with
    ``torch.load(weights_only=True)``), loaded strictly into the module.
    ``input_specs``: declared inputs (from ``input`` lines of a .nc file); when given,
    the example inputs are drawn from them with a fixed seed and they replace any others
    (keyword inputs, by name, for a model whose example inputs are all keywords).
    ``example_args``: explicit positional example inputs (override the factory's).
    ``task``, ``trust_remote_code``, ``batch``, ``seq_len``, ``image_size``: for Hugging Face
    directories only (see :func:`normc.frontend.hf.load_hf_dir`).
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise NormcError("no model given", hint=f"name a model as one of: {ACCEPTED_FORMS}")
    source = source.strip()
    hf_options = dict(task=task, trust_remote_code=trust_remote_code, batch=batch, seq_len=seq_len,
                      image_size=image_size)

    if not source.startswith("zoo:") and os.path.isdir(source):
        from normc.frontend.hf import load_hf_dir

        if weights is not None:
            raise NormcError(f"--weights does not apply to the Hugging Face directory `{source}`",
                             hint="the directory's own safetensors are its weights; drop --weights")
        loaded = load_hf_dir(source, allow_pickle=allow_pickle, **hf_options)
    else:
        given = [k.replace("_", "-") for k, v in hf_options.items() if v not in (None, False)]
        if given:
            raise NormcError(f"--{given[0]} applies to Hugging Face directories only, not to `{source}`",
                             hint="drop it, or name a directory with config.json and safetensors")
        if source.startswith("zoo:"):
            loaded = load_zoo(source[len("zoo:"):])
        else:
            loaded = _load_file_or_factory(source, allow_pickle)

    if weights is not None:
        load_weights(loaded.module, weights)

    if example_args is not None:
        args = example_args if isinstance(example_args, tuple) else (
            tuple(example_args) if isinstance(example_args, list) else (example_args,))
        _check_tensors(args, source, "example_args")
        loaded.example_args = args
        loaded.example_kwargs = {}
        loaded.input_specs = specs_from_examples(args, {}, forward_arg_names(loaded.module))
    if input_specs is not None:
        specs = list(input_specs)
        if example_args is None:
            if loaded.example_kwargs and not loaded.example_args:
                _declared_as_keywords(loaded, specs, source)
            else:
                loaded.example_args = sample_examples(specs)
                loaded.example_kwargs = {}
        loaded.input_specs = specs

    if loaded.example_args is None:
        raise NormcError(
            f"`{source}` gives a model but no example inputs",
            hint="return `(module, example_inputs)` from the factory, or declare the inputs "
            "in the .nc file, e.g. `input x: f32[1, 3, 224, 224]`",
        )
    set_eval(loaded.module)
    loaded.source = source
    return loaded


def _declared_as_keywords(loaded: LoadedModel, specs: list[InputSpec], source: str) -> None:
    """Declared inputs of a model called with keywords only (a Hugging Face directory, a factory
    whose example is a dict): each is the keyword argument of its name."""
    import inspect

    try:
        params = inspect.signature(loaded.module.forward).parameters
    except (TypeError, ValueError):
        params = {}
    # a plain `**kwargs` takes any name; a transformers model's `**kwargs` are attention options
    any_name = loaded.hf_dir is None and any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [] if any_name else [s.name for s in specs if s.name not in params]
    if unknown:
        takes = ", ".join(n for n in params if n not in ("self", "kwargs"))[:200]
        raise NormcError(f"the declared input `{unknown[0]}` is not an argument of {type(loaded.module).__name__}"
                         f".forward (`{source}`)",
                         hint=f"name the inputs after its arguments: {takes}")
    values = sample_examples(specs)
    loaded.example_args = ()
    loaded.example_kwargs = {s.name: v for s, v in zip(specs, values)}


# --------------------------------------------------------------------------- dispatch


def _load_file_or_factory(source: str, allow_pickle: bool) -> LoadedModel:
    lower = source.lower()
    if lower.endswith(".pt2"):
        return _load_pt2(source, allow_pickle)
    if lower.endswith(_PICKLE_SUFFIXES):
        return _load_pickle(source, allow_pickle)
    if lower.endswith(_WEIGHT_SUFFIXES):
        _require_file(source)
        raise NormcError(
            f"`{source}` holds weights only, not a model",
            hint="pass it as --weights together with a factory, e.g. "
            f"`normc apply rules.nc model.py:build --weights {source}`",
        )
    if ":" in source:
        target, _, func = source.rpartition(":")
        if target and func and func.replace(".", "").replace("_", "").isalnum():
            if target.lower().endswith(".py") or os.sep in target or "/" in target:
                return _load_factory_file(source, target, func)
            if all(part.isidentifier() for part in target.split(".")):
                return _load_factory_module(source, target, func)
    if lower.endswith(".py"):
        raise NormcError(
            f"`{source}` names a Python file but not the function that builds the model",
            hint=f"write `{source}:FUNCTION`, where FUNCTION returns an nn.Module or (module, example_inputs)",
        )
    if os.path.exists(source):
        raise NormcError(f"`{source}` is not a model format normc reads", hint=f"use one of: {ACCEPTED_FORMS}")
    raise NormcError(f"`{source}` is not a file or a model name normc understands",
                     hint=f"use one of: {ACCEPTED_FORMS}")


def _require_file(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise NormcError(f"`{path}` does not exist", hint="check the path (it is relative to the current folder)")
    if not p.is_file():
        raise NormcError(f"`{path}` is not a file", hint="name the file itself, not its folder")
    return p


# --------------------------------------------------------------------------- factories


def _load_factory_file(source: str, file: str, func: str) -> LoadedModel:
    path = _require_file(file).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"_normc_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise NormcError(f"cannot import `{file}`", hint="name a Python source file ending in .py")
    module = importlib.util.module_from_spec(spec)
    parent = str(path.parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)  # let the factory import its sibling modules
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # noqa: BLE001 - user code may raise anything
        sys.modules.pop(mod_name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise NormcError(f"importing `{file}` failed: {_one_line(e)}",
                         hint=f"fix the error in `{file}` (run `python {file}` to see the traceback)") from e
    finally:
        if added:
            try:
                sys.path.remove(parent)
            except ValueError:
                pass
    return _call_factory(source, module, func, where=f"`{file}`")


def _load_factory_module(source: str, modname: str, func: str) -> LoadedModel:
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            raise NormcError(f"no Python module named `{modname}`",
                             hint="check the spelling, install the package, or give a file path "
                             "like `path/to/file.py:function`") from e
        raise NormcError(f"importing `{modname}` failed: {_one_line(e)}",
                         hint="install the missing dependency") from e
    except SystemExit as e:
        raise NormcError(f"importing `{modname}` called sys.exit({e.code!r})",
                         hint=f"guard the script part of `{modname}` with `if __name__ == \"__main__\":`") from None
    except Exception as e:  # noqa: BLE001
        raise NormcError(f"importing `{modname}` failed: {_one_line(e)}",
                         hint=f"fix the error in `{modname}`") from e
    return _call_factory(source, module, func, where=f"`{modname}`")


def _call_factory(source: str, module: Any, func: str, where: str) -> LoadedModel:
    obj = module
    for part in func.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            import difflib

            close = difflib.get_close_matches(part, names, n=1)
            hint = f"did you mean `{close[0]}`?" if close else (
                "functions there: " + ", ".join(names[:10]) if names else "define the function in that file")
            raise NormcError(f"{where} has no function `{func}`", hint=hint)
        obj = getattr(obj, part)
    if not callable(obj):
        raise NormcError(f"`{func}` in {where} is not callable",
                         hint="name a function that returns an nn.Module or (module, example_inputs)")
    try:
        result = obj()
    except SystemExit as e:  # would end normc with the factory's status and no output
        raise NormcError(f"`{func}()` from {where} called sys.exit({e.code!r}) instead of returning a model",
                         hint="return an nn.Module (or (module, example_inputs)) from the factory") from None
    except Exception as e:  # noqa: BLE001
        raise NormcError(f"calling `{func}()` from {where} failed: {_one_line(e)}",
                         hint="the factory is called with no arguments; give its parameters defaults") from e
    return _from_result(source, result, what=f"`{func}()` in {where}")


def _from_result(source: str, result: Any, what: str) -> LoadedModel:
    """Turn ``module`` or ``(module, example_inputs)`` into a LoadedModel."""
    example: Any = None
    if isinstance(result, nn.Module):
        module = result
    elif isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        module, example = result
    else:
        raise NormcError(f"{what} returned {type(result).__name__}, not a model",
                         hint="return an nn.Module or a pair `(module, example_inputs)`")
    set_eval(module)
    names = forward_arg_names(module)
    args: tuple | None
    kwargs: dict = {}
    if example is None:
        args = None
        specs: list[InputSpec] = []
    else:
        args, kwargs = split_examples(example, source, what)
        specs = specs_from_examples(args, kwargs, names)
    return LoadedModel(module, args, kwargs, specs, source, _is_hf(module))


def split_examples(example: Any, source: str, what: str = "the example inputs") -> tuple[tuple, dict]:
    """``(args, kwargs)`` from example inputs given as a tensor, a tuple/list of tensors
    (positional), a dict of tensors (keywords) or an ``(args_tuple, kwargs_dict)`` pair."""
    kwargs: dict = {}
    if isinstance(example, torch.Tensor):
        args: tuple = (example,)
    elif (isinstance(example, tuple) and len(example) == 2 and isinstance(example[0], (tuple, list))
          and isinstance(example[1], dict)):
        args, kwargs = tuple(example[0]), dict(example[1])
    elif isinstance(example, (tuple, list)):
        args = tuple(example)
    elif isinstance(example, dict):
        args, kwargs = (), dict(example)
    else:
        raise NormcError(
            f"{what} gave example inputs of type {type(example).__name__}",
            hint="example inputs must be a tensor, a tuple of tensors or a dict of tensors")
    _check_tensors(args, source, "example inputs")
    _check_tensors(tuple(kwargs.values()), source, "example inputs")
    return args, kwargs


def load_module(module: nn.Module, example_inputs: Any = None, *, source: str | None = None) -> LoadedModel:
    """A LoadedModel for an ``nn.Module`` the caller already holds (the library API).

    ``example_inputs``: a tensor, a tuple/list of tensors, a dict of tensors, or ``(args, kwargs)``;
    None leaves them to the caller (e.g. the rules' ``input`` declarations). The module is put
    in ``eval()`` mode in place (normc compiles for inference); its weights are not copied here.
    """
    if not isinstance(module, nn.Module):
        raise NormcError(f"expected an nn.Module, got {type(module).__name__}",
                         hint="pass the model object, or a model source string")
    name = source or type(module).__name__
    result = module if example_inputs is None else (module, example_inputs)
    loaded = _from_result(name, result, what=f"`{name}`")
    loaded.source = name
    return loaded


def _check_tensors(values: tuple, source: str, what: str) -> None:
    for v in values:
        if not isinstance(v, torch.Tensor):
            raise NormcError(f"{what} of `{source}` contain a {type(v).__name__}, not a tensor",
                             hint="pass only tensors as example inputs")


def _is_hf(module: nn.Module) -> bool:
    # A PreTrainedModel can only exist if transformers is already imported; never import it here.
    tf = sys.modules.get("transformers")
    if tf is None:
        return False
    try:
        return isinstance(module, tf.PreTrainedModel)
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- files


class _PickleRefused(Exception):
    pass


@contextlib.contextmanager
def _no_code_unpickling():
    """Make ``torch.export.load`` unable to run code from the file.

    In torch 2.13 ``torch.export.load`` falls back to ``torch.load(weights_only=False)``
    when a stored blob (example inputs, constants) fails the safe loader, and unpickles
    "opaque" constants with ``pickle.loads``: a crafted .pt2 runs code. For the duration
    of the call, every ``torch.load`` is forced to ``weights_only=True`` and the archive
    reader's ``pickle.loads`` refuses.
    """
    real_load = torch.load

    def safe_load(f, *args, weights_only=None, **kwargs):
        try:
            return real_load(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            raise _PickleRefused(str(e)) from e
        except Exception:
            if weights_only is False:  # the caller wanted the unsafe loader: refuse
                raise _PickleRefused("needs the unsafe unpickler")
            raise

    class _Pickle:
        def __getattr__(self, name):
            return getattr(pickle, name)

        @staticmethod
        def loads(*_a, **_k):
            raise _PickleRefused("opaque pickled constant")

        load = loads

    package = None
    try:
        package = importlib.import_module("torch.export.pt2_archive._package")
    except ImportError:
        pass
    real_pickle = getattr(package, "pickle", None) if package is not None else None
    torch.load = safe_load
    if real_pickle is not None:
        package.pickle = _Pickle()
    try:
        yield
    finally:
        torch.load = real_load
        if real_pickle is not None:
            package.pickle = real_pickle


def _import_transformers_outputs() -> bool:
    """Register transformers' ModelOutput classes with torch's pytree (once); False if not installed."""
    import sys
    if "transformers.modeling_outputs" in sys.modules:
        return False  # already registered: the failure is something else
    try:
        import transformers.modeling_outputs  # noqa: F401
    except ImportError:
        return False
    return True


def _load_pt2(path: str, allow_pickle: bool = False) -> LoadedModel:
    _require_file(path)
    try:
        if allow_pickle:
            ep = torch.export.load(path)
        else:
            with _no_code_unpickling():
                ep = torch.export.load(path)
    except _PickleRefused as e:
        raise NormcError(
            f"`{path}` contains pickled Python objects; unpickling them runs code from the file",
            hint="pass --allow-pickle only if you trust its author, or re-export it with "
            "plain tensor inputs and constants") from e
    except NotImplementedError as e:
        # a Hugging Face model's archive names its output class (e.g. CausalLMOutputWithCrossAttentions)
        # in its pytree spec: torch can only rebuild it once transformers has registered those classes
        if "transformers" not in str(e) or not _import_transformers_outputs():
            raise NormcError(f"`{path}` is not a readable torch.export program: {_one_line(e)}",
                             hint="its outputs use a class torch cannot rebuild here; install the package "
                                  "that defines it") from e
        return _load_pt2(path, allow_pickle)
    except Exception as e:  # noqa: BLE001
        raise NormcError(f"`{path}` is not a readable torch.export program: {_one_line(e)}",
                         hint="re-save it with `torch.export.save(torch.export.export(model, args), path)`") from e
    module = ep.module()
    args: tuple | None = None
    kwargs: dict = {}
    stored = getattr(ep, "example_inputs", None)
    if stored is not None:
        args, kwargs = tuple(stored[0]), dict(stored[1])
    names = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    specs = specs_from_examples(args, kwargs, names) if args is not None else []
    loaded = LoadedModel(module, args, kwargs, specs, path, False, exported_program=ep)
    if args is None:
        loaded.notes.append(f"`{path}` stores no example inputs")
    return loaded


def _load_pickle(path: str, allow_pickle: bool) -> LoadedModel:
    _require_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        safe = True
    except Exception:  # noqa: BLE001 - UnpicklingError, RuntimeError, ... all mean "needs code"
        safe = False
    if safe:
        if _is_tensor_dict(obj) or (isinstance(obj, dict) and _unwrap_state_dict(obj) is not None):
            raise NormcError(
                f"`{path}` is a state dict (weights only), not a model",
                hint=f"pass it as --weights with a factory that builds the model, e.g. "
                f"`model.py:build --weights {path}`")
        raise NormcError(f"`{path}` holds a {type(obj).__name__}, not a model",
                         hint="save the model with torch.export (.pt2), or give a factory and pass "
                         "its weights with --weights")
    if not allow_pickle:
        raise NormcError(
            f"`{path}` is a pickled Python object; unpickling it runs code from the file",
            hint="pass --allow-pickle only if you trust its author, or re-save it as a state dict / "
            "torch.export .pt2")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        hint = "re-save it as a torch.export .pt2, or use a factory with --weights"
        if isinstance(e, (AttributeError, ModuleNotFoundError, ImportError)):
            hint = ("the classes the pickle refers to must be importable here; make the module that "
                    "defines them importable, or re-save as a torch.export .pt2")
        raise NormcError(f"unpickling `{path}` failed: {_one_line(e)}", hint=hint) from e
    return _from_result(path, obj, what=f"`{path}`")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap_state_dict(obj: Any) -> dict | None:
    """A dict of tensors, or a checkpoint holding one under a usual key."""
    if _is_tensor_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if _is_tensor_dict(obj.get(key)):
                return obj[key]
    return None


# --------------------------------------------------------------------------- weights


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a weights file without running code from it."""
    _require_file(path)
    if path.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise NormcError(f"`{path}` is not a readable safetensors file: {_one_line(e)}",
                             hint="check that the file is complete and really is .safetensors") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, ...: all refusals
        raise NormcError(
            f"`{path}` is not a plain state dict; reading it would run code from the file",
            hint="save only the weights: `torch.save(model.state_dict(), path)` or "
            "`safetensors.torch.save_model(model, path)`") from e
    sd = _unwrap_state_dict(obj)
    if sd is None:
        raise NormcError(f"`{path}` holds a {type(obj).__name__}, not a dict of tensors",
                         hint="save the weights with `torch.save(model.state_dict(), path)`")
    return sd


def _list(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_weights(module: nn.Module, path: str) -> None:
    """Load a weights file strictly into ``module`` (in place).

    A key missing from the file is tolerated only when it names a tensor tied to another
    key that the file does have (e.g. a language-model head tied to the token embedding,
    which ``safetensors.torch.save_model`` stores once).
    """
    sd = read_state_dict(path)
    expected = module.state_dict(keep_vars=True)
    # Names of tied tensors: id(tensor) -> all names.
    aliases: dict[int, list[str]] = {}
    for name, t in expected.items():
        if isinstance(t, torch.Tensor):
            aliases.setdefault(id(t), []).append(name)

    shape_errors = [f"{k} {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if shape_errors:
        raise NormcError(f"`{path}` does not fit the model: {len(shape_errors)} tensors have other shapes: "
                         f"{_list(shape_errors, 3)}",
                         hint="the weights belong to a different configuration of the model; "
                         "build the model with the same sizes")
    missing = [k for k in expected if k not in sd
               and not any(a in sd for a in aliases.get(id(expected[k]), []))]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_list(unexpected)}")
        hint = "the weights belong to another model or were saved from a wrapper"
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = "the keys start with `module.` (saved from DataParallel); save `model.module.state_dict()`"
        raise NormcError(f"`{path}` does not match the model's parameters ({'; '.join(parts)})", hint=hint)
    try:
        module.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise NormcError(f"loading `{path}` failed: {_one_line(e)}",
                         hint="the weights belong to a different configuration of the model") from e
