"""Print mpqflow's import graph by layer (one line per module: `module -> its imports`) and check
the layering in mpqflow/codehash.py (LAYERS); exits 1 and lists the breaches if there are any.

    python bench/import_graph.py [--dot graph.dot]   # then: dot -Tsvg graph.dot -o graph.svg

Imports are read from the source (function-level ones included), not by importing the package.
The implicit parent packages of an import are left out of the listing, for legibility.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpqflow.codehash import LAYERS, ROOT, import_graph, layer_of, layering_violations


def shown(module, deps):
    """The direct imports worth drawing: without the packages above the imported modules."""
    return sorted(d for d in deps if d != module and not any(e.startswith(d + ".") for e in deps))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dot", type=Path, help="also write the graph in Graphviz format here")
    args = ap.parse_args(argv)
    graph = import_graph(ROOT)
    names = [f"layer {i}: {name}" for i, (name, _) in enumerate(LAYERS)] + ["in no layer"]
    groups = {}
    for module in sorted(graph):
        layer = layer_of(module)
        groups.setdefault(len(LAYERS) if layer is None else layer, []).append(module)
    for i in sorted(groups):
        print(f"# {names[i]}")
        for module in groups[i]:
            deps = shown(module, graph[module])
            print(f"{module} -> {', '.join(d.removeprefix('mpqflow.') for d in deps) or '(nothing)'}")
        print()
    if args.dot:
        lines = ["digraph mpqflow {", "  rankdir=BT; node [shape=box, fontsize=10];"]
        for i in sorted(groups):
            lines.append(f'  subgraph cluster_{i} {{ label="{names[i]}";')
            lines += [f'    "{m}";' for m in groups[i]] + ["  }"]
        lines += [f'  "{m}" -> "{d}";' for m in sorted(graph) for d in shown(m, graph[m])]
        args.dot.write_text("\n".join(lines + ["}"]) + "\n")
        print(f"wrote {args.dot}")
    violations = layering_violations(graph)
    print(f"{len(violations)} layering violation(s)")
    for line in violations:
        print(f"  {line}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
