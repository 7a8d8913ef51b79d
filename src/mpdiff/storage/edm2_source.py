"""Why a release pickle's embedded source is refused, read as text and never run.

Each object of NVIDIA's "persistent" classes carries the source of the module that defined it, which
NVIDIA's loader executes. mpdiff never compiles, imports or executes it (storage/edm2_pickle.py); it
only parses it into a syntax tree to refuse files whose source would do anything when imported but
define classes and functions. This is a plausibility check on the file, not what makes reading it
safe: a source that passes is not run either.

What importing the module evaluates: its top-level statements, class bodies, decorators, base classes,
default values and annotations. Those may hold constants, names, attribute chains, containers and
arithmetic of them, and calls of a few harmless builtins and functions that EDM2's own modules call
there (``dict(...)`` defaults, ``torch.device('cuda')``, ``warnings.filterwarnings(...)``), as long as
the module does not define names of its own for them. Anything else (``open(...)``, ``os.system(...)``,
an ``if``, a loop, a class hook such as ``__init_subclass__``) is reported with its line.
"""

import ast

# Callables whose call may appear where the module is evaluated, and the decorators of its classes.
HARMLESS_CALLS = frozenset({"dict", "list", "tuple", "set", "frozenset", "torch.device",
                            "warnings.filterwarnings", "warnings.simplefilter"})
CLASS_DECORATORS = frozenset({"persistence.persistent_class", "persistent_class"})
# Methods that Python calls while a class statement runs (or when another class derives from it).
_CLASS_HOOKS = frozenset({"__init_subclass__", "__set_name__", "__class_getitem__", "__mro_entries__",
                          "__prepare__"})
MAX_SOURCE_CHARS = 2 ** 20  # EDM2's modules are about 20 kB


def _dotted(node):
    """'a.b.c' for a Name or a chain of Attributes on one, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _bindings(body, found=None):
    """{name: kinds} of the names that statements evaluated on import bind (at top level and in class
    bodies): kind 'import' for a plain import of the module of that name, 'other' for anything else."""
    found = {} if found is None else found
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":  # binds names unknown here: none of the harmless calls can be trusted
                    for harmless in HARMLESS_CALLS | CLASS_DECORATORS:
                        found.setdefault(harmless.split(".")[0], set()).add("other")
                    continue
                name = (alias.asname or alias.name).split(".")[0]
                plain = isinstance(node, ast.Import) and alias.asname is None
                found.setdefault(name, set()).add("import" if plain or isinstance(node, ast.ImportFrom)
                                                  and alias.asname is None else "other")
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.setdefault(node.name, set()).add("other")
        if isinstance(node, ast.ClassDef):
            _bindings(node.body, found)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                    found.setdefault(n.id, set()).add("other")
    return found


class _Check:
    def __init__(self, tree):
        bound = _bindings(tree.body)

        def trusted(name):  # a builtin the module leaves alone, or an attribute of a module it imports
            root = name.split(".")[0]
            return root not in bound if root == name else bound.get(root, {"import"}) <= {"import"}

        self.calls = {name for name in HARMLESS_CALLS if trusted(name)}
        self.decorators = {name for name in CLASS_DECORATORS if trusted(name)}

    def value(self, node):
        """Whether evaluating expression `node` runs nothing but the harmless calls."""
        if node is None or isinstance(node, (ast.Constant, ast.Name)):
            return True
        if isinstance(node, ast.Attribute):
            return _dotted(node) is not None
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return all(self.value(e) for e in node.elts)
        if isinstance(node, ast.Dict):
            return all(k is not None and self.value(k) for k in node.keys) and all(map(self.value, node.values))
        if isinstance(node, ast.UnaryOp):
            return isinstance(node.operand, ast.Constant)
        if isinstance(node, ast.BinOp):
            return all(isinstance(side, ast.Constant) or isinstance(side, ast.BinOp) and self.value(side)
                       for side in (node.left, node.right))
        if isinstance(node, ast.Call):
            return _dotted(node.func) in self.calls and all(self.value(a) and not isinstance(a, ast.Starred)
                                                            for a in node.args) \
                and all(k.arg is not None and self.value(k.value) for k in node.keywords)
        return False

    def function(self, node):
        a = node.args
        annotations = [x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x]
        return not node.decorator_list and all(map(self.value, a.defaults + a.kw_defaults + annotations)) \
            and self.value(node.returns)

    def assignment(self, node):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return all(isinstance(t, ast.Name) and t.id not in _CLASS_HOOKS for t in targets) \
            and self.value(getattr(node, "annotation", None)) and self.value(node.value)

    def class_statement(self, node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node.name not in _CLASS_HOOKS and self.function(node)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            return self.assignment(node)
        return isinstance(node, ast.Pass) or isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)

    def statement(self, node):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return True
        if isinstance(node, ast.Expr):
            return isinstance(node.value, ast.Constant) or isinstance(node.value, ast.Call) and self.value(node.value)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return self.function(node)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            return self.assignment(node)
        if isinstance(node, ast.ClassDef):
            return all(_dotted(d) in self.decorators for d in node.decorator_list) and not node.keywords \
                and all(_dotted(b) is not None for b in node.bases) and all(map(self.class_statement, node.body))
        return False


def code_run_on_import(source):
    """None when importing the module `source` would only define things (see the module docstring); else
    a short description of the first statement that would run something: 'line N: <code>'."""
    if len(source) > MAX_SOURCE_CHARS:
        return f"{len(source):,} characters, more than a module of EDM2 has"
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return f"not Python ({type(e).__name__})"
    check = _Check(tree)
    for node in tree.body:
        try:
            fine = check.statement(node)
        except RecursionError:
            fine = False  # nested deeper than any definition needs
        if not fine:
            text = ast.get_source_segment(source, node) or type(node).__name__
            return f"line {node.lineno}: {' '.join(text.split())[:60]}"
    return None
