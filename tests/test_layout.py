"""The package's two halves: the plugin (loss/, criterions/, compat, cli) never imports the pipeline
(pipeline/), and no module of el_fairseq takes part in an import cycle (cli <-> checkpoints was one)."""
import ast
import os
import subprocess
import sys

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "el_fairseq")


def module_name(path):
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path):
    """el_fairseq modules imported anywhere in the file (function bodies included)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("el_fairseq")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("el_fairseq"):
                continue
            for alias in node.names:  # `from . import compat` imports a module, `from .x import f` x
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return found - {name}


MODULES = {}
for root, _, files in os.walk(PACKAGE):
    for f in files:
        if f.endswith(".py"):
            MODULES[module_name(os.path.join(root, f))] = os.path.join(root, f)
GRAPH = {name: {m for m in imports_of(path) if m in MODULES} for name, path in MODULES.items()}


def test_the_modules_are_found():
    assert {"el_fairseq.cli", "el_fairseq.pipeline.checkpoints", "el_fairseq.loss.chunked"} <= set(GRAPH)
    assert "el_fairseq.safe_loading" in GRAPH["el_fairseq.pipeline.checkpoints"]


def test_plugin_never_imports_the_pipeline():
    for name, deps in GRAPH.items():
        if not name.startswith("el_fairseq.pipeline"):
            assert not {d for d in deps if d.startswith("el_fairseq.pipeline")}, name


def test_no_import_cycle():
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in GRAPH[node]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_fairseq_plugin_import_loads_no_pipeline_module():
    code = ("import sys, el_fairseq, el_fairseq.cli, el_fairseq.criterions; "
            "print(sorted(m for m in sys.modules if m.startswith('el_fairseq.pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # the last line: fairseq imports DeepSpeed where it is installed (a test requirement), which logs to stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_parallel_package_sits_above_the_loss_package():
    """el_fairseq.parallel imports the loss package; no loss module imports it (function bodies included):
    api.py and linear.py alone name it, in their DTensor hooks (logits, a projection weight sharded on the
    classes), imported by name once a DTensor exists."""
    assert {"el_fairseq.loss.api", "el_fairseq.loss.bonus"} <= GRAPH["el_fairseq.parallel.vocab_parallel"]
    assert {"el_fairseq.loss.linear", "el_fairseq.parallel.vocab_parallel"} <= GRAPH[
        "el_fairseq.parallel.vocab_parallel_linear"]
    for name, deps in GRAPH.items():
        if name.startswith("el_fairseq.loss"):
            assert not {d for d in deps if d.startswith("el_fairseq.parallel")}, name
    naming = sorted(name for name, path in MODULES.items() if name.startswith("el_fairseq.loss")
                    and "el_fairseq.parallel" in open(path, encoding="utf-8").read())
    assert naming == ["el_fairseq.loss.api", "el_fairseq.loss.linear"]


def test_the_plain_loss_loads_no_parallel_module():
    """Importing the loss loads neither el_fairseq.parallel nor torch's compiler (torch._dynamo, ~2 s, which
    loads torch.distributed.tensor); using it loads no parallel module of ours. (torch loads its compiler at
    the first call of any torch.library custom op, ours (ops.py) included, as for its own linear_cross_entropy.)"""
    code = ("import sys, torch, el_fairseq; print(sorted(m for m in sys.modules if m.startswith('el_fairseq.parallel') "
            "or m in ('torch._dynamo', 'torch.distributed.tensor'))); "
            "el_fairseq.encouraging_loss(torch.randn(3, 5), torch.tensor([0, 1, 2])); "
            "el_fairseq.encouraging_linear_loss(torch.randn(3, 4, requires_grad=True), torch.randn(5, 4), "
            "torch.tensor([0, 1, 2])).backward(); "
            "print(sorted(m for m in sys.modules if m.startswith('el_fairseq.parallel')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "[]"]
