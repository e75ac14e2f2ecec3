"""Services talk through Redis only: no module of one service imports another service (shared
code lives in ``conspo/``), and ``conspo/`` imports no service at all (the dependency points one
way). Checked on the source, every import statement, lazy ones included. ``conspo.cli`` names
service modules by string (it is the composition root, ``SERVICES`` and ``EVAL_ENGINES``) and
imports them only to run them."""

from __future__ import annotations

import ast

from conspo.testing import REPO_ROOT

SERVICES = REPO_ROOT / "services"
CONSPO = REPO_ROOT / "conspo"
ROLES = sorted(p.name for p in SERVICES.iterdir() if (p / "__init__.py").is_file())


def imported_modules(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_no_service_imports_another_service():
    assert ROLES == ["api", "generator", "learner", "verifier"]
    crossings = []
    for role in ROLES:
        for path in sorted((SERVICES / role).rglob("*.py")):
            for module in imported_modules(path):
                parts = module.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] != role:
                    crossings.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    assert not crossings, "\n".join(crossings)


def test_conspo_never_imports_a_service():
    upward = [
        f"{path.relative_to(REPO_ROOT)} imports {module}"
        for path in sorted(CONSPO.rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] == "services"
    ]
    assert not upward, "\n".join(upward)


def test_the_check_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from services.verifier.pool import GradingPool\n")
    assert "services.verifier.pool" in imported_modules(source)
