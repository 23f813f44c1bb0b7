"""Every gin binding of a run must be read by the stage that runs.

gin accepts a binding to any registered configurable, called or not: ``LoraTeacherConfig.rank``
in a ``train`` run, ``evaluate.x`` in a training run file or ``NIConfig.on_error`` where no
NIConfig is built would parse and change nothing. Each entry point registered in
``tagi_jax.configurables`` calls ``check_bindings_used`` before its stage starts, when gin has
evaluated every ``@Configurable()`` of the stage's own arguments, and a
binding that is still not in gin's operative config (what was actually used) is an error naming
it. Macros (``NAME = value``, no dot) are exempt: they are values that bindings refer to.
Without a parsed config (a direct Python call) there is nothing to check.
"""

from __future__ import annotations

import gin


def _binding_keys(config_text: str) -> set[tuple[tuple[str, ...], str]]:
    """``{(scope components, "configurable.param")}`` of the bindings in a gin config string."""
    keys = set()
    for line in config_text.splitlines():
        # Bindings start at column 0; continuation lines are indented, comments start with '#'.
        if not line or line[0].isspace() or line.startswith(("#", "import ", "from ")):
            continue
        if "=" not in line:
            continue
        key = line.split("=", 1)[0].strip()
        *scope, name = key.split("/")
        if "." in name:  # a macro's name has no dot
            keys.add((tuple(scope), name))
    return keys


def unused_bindings() -> list[str]:
    """Bindings of the parsed config that no configurable call has read so far, sorted."""
    bound = _binding_keys(gin.config_str())
    used = _binding_keys(gin.operative_config_str())
    unused = []
    for scope, name in bound:
        # gin applies a binding of scope s wherever the call's scope starts with s.
        if not any(n == name and s[: len(scope)] == scope for s, n in used):
            unused.append("/".join((*scope, name)))
    return sorted(unused)


def check_bindings_used(stage: str) -> None:
    """Raises ``ValueError`` naming every binding ``stage`` never used (see the module)."""
    unused = unused_bindings()
    if unused:
        raise ValueError(
            f"gin bindings never used by this stage ({stage}): {', '.join(unused)}; nothing "
            "this stage builds reads them (a setting of another stage, or of a configurable no "
            "@Name() refers to): remove them, or refer to their configurable"
        )
