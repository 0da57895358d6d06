"""A self-contained HTML page showing a graph before and after a rewrite, side by side.

    render_diff_html(before_gm, after_gm, result.report, "diff.html")
    render_result_diff(result, "diff.html")        # re-traces the "before" graph from result.loaded

One file, no network, no server: inline CSS, a little inline JS, inline SVG.

Layout, chosen to stay readable for ~300-node graphs (a 20-block ResNet):
  * nodes are grouped by module path into nested, collapsible boxes (``<details>``);
    a chain of modules with nothing else in it is shown as one box ("encoder.stages.0");
  * inside a box, each run of consecutive nodes is one small SVG: a vertical list of
    node boxes (op, node name, module, shape), edges within the run drawn on the left,
    inputs from elsewhere named on the right ("← conv_5");
  * parameters (``get_attr`` nodes) are not drawn: each node lists its parameters in
    its tooltip and shows how many it has;
  * before: nodes that no longer exist are red (class ``removed``); after: new nodes are
    green (class ``added``); nodes kept whose inputs or parameters changed are amber
    (class ``rewired``). Nodes are matched by name and op.
  * above the graphs: the verdict, the op-count table (before / after / change), the
    per-rule sites (applied, skipped with reasons, near misses), the verified outputs.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

import torch.fx as fx

from ..atomic import atomic_path
from ..ir.graph import module_path, op_counts, op_name

__all__ = ["render_diff_html", "render_result_diff", "diff_html"]

SIDES = ("before", "after")


# --------------------------------------------------------------------------- model of the page
@dataclass
class _Node:
    name: str
    op: str           # canonical op name, 'input' or 'output'
    kind: str         # fx node.op
    path: str
    inputs: list[str]                 # visible (non-parameter) input node names
    params: list[tuple[str, str]]     # (target, shape) of parameter inputs
    shape: str
    target: str
    status: str = "same"              # same | removed | added | rewired
    users: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.op)


@dataclass
class _Group:
    path: str
    children: list = field(default_factory=list)   # _Node | _Group, in first-appearance order
    label: str = ""

    def nodes(self):
        for c in self.children:
            if isinstance(c, _Group):
                yield from c.nodes()
            else:
                yield c


def _shape_text(node: fx.Node) -> str:
    shape = node.meta.get("normc_shape")
    if shape is None:
        val = node.meta.get("val", node.meta.get("tensor_meta"))
        shape = getattr(val, "shape", None)
    if shape is None:
        return ""
    try:
        return "[" + ",".join(str(int(s)) for s in shape) + "]"
    except (TypeError, ValueError):
        return "[" + ",".join(str(s) for s in shape) + "]"


def _target_text(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def _collect(gm: fx.GraphModule) -> list[_Node]:
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "get_attr" or n.target == "_guards_fn":  # parameters; torch.export's guard check
            continue
        if n.op == "placeholder":
            op = "input"
        elif n.op == "output":
            op = "output"
        else:
            op = op_name(n, gm) or n.op
        inputs, params = [], []
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                params.append((str(a.target), _shape_text(a)))
            else:
                inputs.append(a.name)
        nodes.append(_Node(n.name, op, n.op, module_path(n) if n.op not in ("placeholder", "output") else "",
                           inputs, params, _shape_text(n), _target_text(n),
                           users=[u.name for u in n.users if u.op != "get_attr"]))
    return nodes


def _mark(before: list[_Node], after: list[_Node]) -> None:
    b = {n.key: n for n in before}
    a = {n.key: n for n in after}
    for n in before:
        other = a.get(n.key)
        n.status = "removed" if other is None else ("rewired" if _wiring(n) != _wiring(other) else "same")
    for n in after:
        other = b.get(n.key)
        n.status = "added" if other is None else ("rewired" if _wiring(n) != _wiring(other) else "same")


def _wiring(n: _Node):
    return (tuple(n.inputs), tuple(t for t, _ in n.params))


def _container_paths(paths: set[str]) -> set[str]:
    """Paths that other paths lie under (modules with submodules that own nodes)."""
    out = set()
    for p in paths:
        parts = p.split(".")
        for i in range(1, len(parts)):
            out.add(".".join(parts[:i]))
    return out


def _group_path(path: str, containers: set[str]) -> str:
    if not path or path in containers:
        return path
    return path.rsplit(".", 1)[0] if "." in path else ""


def _build_tree(nodes: list[_Node], containers: set[str]) -> _Group:
    root = _Group("")
    groups = {"": root}
    for n in nodes:
        gpath = _group_path(n.path, containers)
        if gpath not in groups:
            parts = gpath.split(".")
            parent = root
            for i in range(1, len(parts) + 1):
                p = ".".join(parts[:i])
                g = groups.get(p)
                if g is None:
                    g = groups[p] = _Group(p)
                    parent.children.append(g)
                parent = g
        groups[gpath].children.append(n)
    _compress(root)
    return root


def _compress(group: _Group) -> None:
    """Merge chains of boxes that hold nothing but one box; set each box's label."""
    new_children = []
    for c in group.children:
        if isinstance(c, _Group):
            while len(c.children) == 1 and isinstance(c.children[0], _Group):
                c = c.children[0]
            prefix = group.path + "." if group.path else ""
            c.label = c.path[len(prefix):] if c.path.startswith(prefix) else c.path
            _compress(c)
        new_children.append(c)
    group.children = new_children


# --------------------------------------------------------------------------- rendering
_E = lambda s: html.escape(str(s), quote=True)  # noqa: E731

ROW, BOX_H, CHAR_W, PAD = 24, 18, 7.5, 8
_MAX_ARC_LEVELS = 6


def _label(n: _Node, group_path: str) -> tuple[str, str, str]:
    leaf = n.path
    if group_path and leaf.startswith(group_path + "."):
        leaf = leaf[len(group_path) + 1:]
    elif leaf == group_path:
        leaf = ""
    extra = f" {leaf}" if leaf else ""
    ptxt = f" +{len(n.params)}p" if n.params else ""
    return n.op, f" {n.name}{extra}", f" {n.shape}{ptxt}" if n.shape or ptxt else ""


def _svg_run(run: list[_Node], side: str, group_path: str) -> str:
    index = {n.name: i for i, n in enumerate(run)}
    edges = []          # (src index, dst index)
    outside = []        # per node: input names from outside the run
    for j, n in enumerate(run):
        ext = []
        for a in n.inputs:
            i = index.get(a)
            if i is not None and i < j:
                edges.append((i, j))
            else:
                ext.append(a)
        outside.append(ext)
    arcs = sorted({(i, j) for i, j in edges if j - i > 1}, key=lambda e: (e[1] - e[0], e[0]))
    levels: dict[tuple[int, int], int] = {}
    busy: list[list[tuple[int, int]]] = [[] for _ in range(_MAX_ARC_LEVELS)]
    for e in arcs:
        lvl = _MAX_ARC_LEVELS - 1
        for k in range(_MAX_ARC_LEVELS):
            if all(e[1] <= o[0] or e[0] >= o[1] for o in busy[k]):
                lvl = k
                break
        busy[lvl].append(e)
        levels[e] = lvl
    n_levels = (max(levels.values()) + 1) if levels else 0
    x0 = 6 + 7 * n_levels
    labels = [_label(n, group_path) for n in run]
    box_w = max(int(CHAR_W * max(len(a) + len(b) + len(c) for a, b, c in labels)) + 2 * PAD, 160)
    ext_w = max((int(CHAR_W * (3 + len(", ".join(e)))) for e in outside if e), default=0)
    ext_w = min(ext_w, 260)
    width = x0 + box_w + (ext_w + 8 if ext_w else 0) + 4
    height = len(run) * ROW + 4
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="run" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}">']
    for i, j in edges:
        ya, yb = 2 + i * ROW + BOX_H, 2 + j * ROW
        if j - i == 1:
            xm = x0 + 12
            out.append(f'<line class="edge" x1="{xm}" y1="{ya}" x2="{xm}" y2="{yb}"/>')
        else:
            xl = x0 - 7 * (levels[(i, j)] + 1)
            y1, y2 = 2 + i * ROW + BOX_H / 2, 2 + j * ROW + BOX_H / 2
            out.append(f'<path class="edge arc" d="M{x0} {y1} C{xl} {y1} {xl} {y2} {x0} {y2}"/>')
    for k, n in enumerate(run):
        y = 2 + k * ROW
        op, name, meta = labels[k]
        tip = _tooltip(n)
        out.append(f'<g class="node {n.status}" id="{side}-{_E(n.name)}" data-key="{_E(n.name)}" '
                   f'data-op="{_E(n.op)}" tabindex="0"><title>{_E(tip)}</title>'
                   f'<rect x="{x0}" y="{y}" width="{box_w}" height="{BOX_H}" rx="4"/>'
                   f'<text x="{x0 + PAD}" y="{y + 13}"><tspan class="op">{_E(op)}</tspan>'
                   f'<tspan class="nm">{_E(name)}</tspan><tspan class="meta">{_E(meta)}</tspan></text></g>')
        if outside[k]:
            txt = ", ".join(outside[k])
            if len(txt) > 36:
                txt = txt[:33] + "..."
            out.append(f'<text class="ext" x="{x0 + box_w + 6}" y="{y + 13}">\u2190 {_E(txt)}</text>')
    out.append("</svg>")
    return "".join(out)


def _tooltip(n: _Node) -> str:
    lines = [f"{n.op}  {n.name}  [{n.status}]", f"module: {n.path or '(root)'}", f"target: {n.target}"]
    if n.shape:
        lines.append(f"shape: {n.shape}")
    if n.inputs:
        lines.append("inputs: " + ", ".join(n.inputs))
    for t, s in n.params:
        lines.append(f"param: {t} {s}")
    if n.users:
        lines.append("users: " + ", ".join(n.users))
    return "\n".join(lines)


def _render_group(g: _Group, side: str, depth: int) -> str:
    parts = []
    run: list[_Node] = []

    def flush():
        if run:
            parts.append(_svg_run(list(run), side, g.path))
            run.clear()

    for c in g.children:
        if isinstance(c, _Group):
            flush()
            parts.append(_render_group(c, side, depth + 1))
        else:
            run.append(c)
    flush()
    if depth == 0:
        return "".join(parts)
    nodes = list(g.nodes())
    counts = {s: sum(1 for n in nodes if n.status == s) for s in ("removed", "added", "rewired")}
    changed = any(counts.values())
    badges = "".join(f'<span class="badge {s}">{"−" if s == "removed" else "+" if s == "added" else "~"}{v}</span>'
                     for s, v in counts.items() if v)
    return (f'<details class="grp{" changed" if changed else ""}" data-path="{_E(g.path)}" open>'
            f'<summary><span class="gl">{_E(g.label or "(root)")}</span> '
            f'<span class="gn">{len(nodes)} node{"s" if len(nodes) != 1 else ""}</span>{badges}</summary>'
            f'<div class="gb">{"".join(parts)}</div></details>')


def _op_table(before: dict[str, int], after: dict[str, int]) -> str:
    rows = []
    for op in sorted(set(before) | set(after)):
        b, a = before.get(op, 0), after.get(op, 0)
        d = a - b
        cls = "down" if d < 0 else "up" if d > 0 else ""
        rows.append(f'<tr class="{cls}"><td>{_E(op)}</td><td class="n">{b}</td><td class="n">{a}</td>'
                    f'<td class="n">{"+" if d > 0 else ""}{d if d else ""}</td></tr>')
    tb, ta = sum(before.values()), sum(after.values())
    rows.append(f'<tr class="total"><td>total</td><td class="n">{tb}</td><td class="n">{ta}</td>'
                f'<td class="n">{"+" if ta > tb else ""}{ta - tb if ta != tb else ""}</td></tr>')
    return ('<table class="ops"><thead><tr><th>op</th><th>before</th><th>after</th><th>change</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _fmt(x, spec=".3g") -> str:
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return "-" if x is None else _E(x)


def _site_link(key: str | None, site: str, names: dict[str, set[str]]) -> str:
    for side in SIDES:
        if key and key in names[side]:
            return f'<a href="#{side}-{_E(key)}" data-key="{_E(key)}" class="site">{_E(site)}</a>'
    return _E(site)


def _rules_html(report: dict, names: dict[str, set[str]]) -> str:
    rules = report.get("rules") or []
    if not rules:
        return '<p class="muted">no rules were applied</p>'
    out = []
    for r in rules:
        sites = r.get("sites") or []
        skipped = r.get("skipped") or []
        near = r.get("near_misses") or []
        head = (f'<summary><b>{_E(r.get("name"))}</b> <span class="muted">{_E(r.get("kind", ""))}</span> '
                f'<span class="badge added">{r.get("applied", 0)} applied</span>'
                + (f'<span class="badge removed">{len(skipped)} skipped</span>' if skipped else "")
                + (f'<span class="badge rewired">{r.get("near_miss_count", len(near))} near</span>' if near else "")
                + "</summary>")
        body = []
        if sites:
            body.append('<div class="sub">sites</div><ul class="sites">' + "".join(
                f'<li>{_site_link(s.get("key"), s.get("site", ""), names)}</li>' for s in sites) + "</ul>")
        if skipped:
            body.append('<div class="sub">skipped</div><ul class="sites">' + "".join(
                f'<li>{_site_link(s.get("key"), s.get("site", ""), names)}: '
                f'<span class="reason">{_E(s.get("reason"))}</span></li>' for s in skipped) + "</ul>")
        if near:
            body.append('<details class="near"><summary>near misses</summary><ul class="sites">' + "".join(
                f'<li>{_E(s.get("site"))}: <span class="reason">{_E(s.get("reason"))}</span></li>' for s in near)
                + "</ul></details>")
        if r.get("notes"):
            body.append('<ul class="notes">' + "".join(f"<li>{_E(n)}</li>" for n in r["notes"]) + "</ul>")
        out.append(f'<details class="rule" open>{head}{"".join(body)}</details>')
    return "".join(out)


def _verify_html(report: dict) -> str:
    v = report.get("verify") or {}
    if not v:
        return ""
    ok = v.get("passed")
    line = (f'<p><span class="verdict {"pass" if ok else "fail"}">{"verified" if ok else "FAILED"}</span> '
            f'max_abs {_fmt(v.get("max_abs_err"))} · max_rel {_fmt(v.get("max_rel_err"))} · '
            f'min cosine {_fmt(v.get("min_cosine"), ".9f")} · {_E(v.get("n_inputs", "?"))} input(s)</p>')
    if v.get("failure"):
        line += f'<p class="failure">{_E(v["failure"])}</p>'
    outs = v.get("outputs") or []
    if outs:
        rows = "".join(
            f'<tr class="{"" if o.get("passed") else "bad"}"><td>{_E(o.get("name"))}</td><td>{_E(o.get("shape"))}</td>'
            f'<td>{_E(o.get("dtype", ""))}</td><td class="n">{_fmt(o.get("max_abs"))}</td>'
            f'<td class="n">{_fmt(o.get("max_rel"))}</td><td class="n">{_fmt(o.get("cosine"), ".9f")}</td>'
            f'<td>{"ok" if o.get("passed") else "FAIL"}{(" — " + _E(o["note"])) if o.get("note") else ""}</td></tr>'
            for o in outs)
        line += ('<table class="outs"><thead><tr><th>output</th><th>shape</th><th>dtype</th><th>max_abs</th>'
                 f'<th>max_rel</th><th>cosine</th><th></th></tr></thead><tbody>{rows}</tbody></table>')
    return line


_CSS = """
:root{--red:#d73a49;--redbg:#ffeef0;--green:#22863a;--greenbg:#e6ffed;--amber:#b08800;--amberbg:#fff8c5;
--fg:#24292e;--muted:#6a737d;--line:#d1d5da;--bg:#fff;--box:#f6f8fa}
*{box-sizing:border-box}body{font:13px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--fg);
margin:0;background:var(--bg)}header{padding:12px 18px;border-bottom:1px solid var(--line);position:sticky;top:0;
background:#fff;z-index:2}h1{font-size:17px;margin:0 0 4px}h2{font-size:14px;margin:14px 0 6px}
.muted{color:var(--muted)}main{padding:0 18px 40px}.top{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
.top>section{min-width:260px}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid var(--line);
padding:2px 8px;text-align:left}th{background:var(--box)}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.down td{background:var(--redbg)}tr.up td{background:var(--greenbg)}tr.total td{font-weight:600}
tr.bad td{background:var(--redbg)}.verdict{font-weight:700;padding:1px 8px;border-radius:10px;color:#fff}
.verdict.pass{background:var(--green)}.verdict.fail{background:var(--red)}.failure{color:var(--red)}
.badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:9px;margin-left:4px;border:1px solid}
.badge.removed{color:var(--red);border-color:var(--red);background:var(--redbg)}
.badge.added{color:var(--green);border-color:var(--green);background:var(--greenbg)}
.badge.rewired{color:var(--amber);border-color:var(--amber);background:var(--amberbg)}
.rule{margin:2px 0}.rule>summary{cursor:pointer}.sub{font-weight:600;margin-top:2px}
ul.sites{margin:0 0 4px;padding-left:20px;max-height:220px;overflow:auto}.reason{color:var(--muted)}
a.site{color:#0366d6;text-decoration:none}a.site:hover{text-decoration:underline}
.controls{margin:10px 0;display:flex;gap:6px;align-items:center;flex-wrap:wrap}
button{font:inherit;font-size:12px;padding:2px 10px;border:1px solid var(--line);border-radius:4px;background:var(--box);
cursor:pointer}input[type=search]{font:inherit;font-size:12px;padding:2px 6px;width:220px}
.legend span{margin-right:10px}.sw{display:inline-block;width:11px;height:11px;border:1px solid;vertical-align:-1px;
margin-right:3px;border-radius:2px}.graphs{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.col{min-width:0;overflow-x:auto}.col>h2{position:sticky;top:0;background:#fff}
details.grp{border:1px solid var(--line);border-radius:6px;margin:4px 0 4px 0;background:#fff}
details.grp>summary{cursor:pointer;padding:2px 8px;background:var(--box);border-radius:6px;font-family:ui-monospace,
SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;white-space:nowrap}.gl{font-weight:600}.gn{color:var(--muted)}
details.grp.changed>summary{border-left:3px solid var(--amber)}.gb{padding:2px 0 2px 12px}
svg.run{display:block;margin:2px 0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
svg .node rect{fill:var(--box);stroke:#959da5;stroke-width:1}svg .node{cursor:pointer}
svg .node.removed rect{fill:var(--redbg);stroke:var(--red);stroke-width:1.5}
svg .node.added rect{fill:var(--greenbg);stroke:var(--green);stroke-width:1.5}
svg .node.rewired rect{fill:var(--amberbg);stroke:var(--amber)}
svg .node.removed .nm,svg .node.removed .op{fill:var(--red)}svg .node.added .op,svg .node.added .nm{fill:var(--green)}
svg .node.hl rect{stroke:#0366d6;stroke-width:2.5}svg .op{font-weight:700}svg .meta{fill:var(--muted)}
svg .ext{fill:var(--muted);font-size:11px}svg .edge{stroke:#959da5;fill:none;stroke-width:1.2}
body.only-changed details.grp:not(.changed){display:none}
"""

_JS = """
(function(){
function all(s,r){return Array.prototype.slice.call((r||document).querySelectorAll(s));}
function setOpen(sel,open){all(sel).forEach(function(d){d.open=open;});}
document.getElementById('expand').onclick=function(){setOpen('details.grp',true);};
document.getElementById('collapse').onclick=function(){setOpen('details.grp',false);};
document.getElementById('changed').onclick=function(){document.body.classList.toggle('only-changed');
  this.textContent=document.body.classList.contains('only-changed')?'show all groups':'only changed groups';};
var syncing=false;
all('details.grp').forEach(function(d){d.addEventListener('toggle',function(){
  if(syncing)return;syncing=true;var p=d.getAttribute('data-path');
  all('details.grp').forEach(function(o){if(o!==d&&o.getAttribute('data-path')===p)o.open=d.open;});
  syncing=false;});});
function reveal(el){var p=el.parentNode;while(p){if(p.tagName==='DETAILS')p.open=true;p=p.parentNode;}}
function highlight(key){all('.node.hl').forEach(function(n){n.classList.remove('hl');});
  var found=[];all('.node').forEach(function(n){if(n.getAttribute('data-key')===key){n.classList.add('hl');
  reveal(n);found.push(n);}});return found;}
all('.node').forEach(function(n){n.addEventListener('click',function(){
  var f=highlight(n.getAttribute('data-key'));f.forEach(function(o){if(o!==n&&o.scrollIntoView)
  o.scrollIntoView({block:'center'});});});});
all('a.site').forEach(function(a){a.addEventListener('click',function(ev){
  var f=highlight(a.getAttribute('data-key'));if(f.length&&f[0].scrollIntoView){ev.preventDefault();
  f[0].scrollIntoView({block:'center'});}});});
var q=document.getElementById('find');q.addEventListener('keydown',function(ev){if(ev.key!=='Enter')return;
  var t=q.value.trim();if(!t)return;var hits=all('.node').filter(function(n){
  return n.getAttribute('data-key')===t||n.getAttribute('data-op')===t;});
  if(!hits.length)hits=all('.node').filter(function(n){return n.getAttribute('data-key').indexOf(t)>=0;});
  all('.node.hl').forEach(function(n){n.classList.remove('hl');});
  hits.forEach(function(n){n.classList.add('hl');reveal(n);});
  if(hits.length&&hits[0].scrollIntoView)hits[0].scrollIntoView({block:'center'});
  document.getElementById('hits').textContent=hits.length+' match'+(hits.length===1?'':'es');});
document.body.setAttribute('data-ready','1');
})();
"""


def diff_html(before: fx.GraphModule, after: fx.GraphModule, report: dict | None = None,
              title: str | None = None) -> str:
    """The page as a string (see `render_diff_html`)."""
    report = report or {}
    nb, na = _collect(before), _collect(after)
    _mark(nb, na)
    containers = _container_paths({n.path for n in nb + na if n.path})
    trees = {"before": _build_tree(nb, containers), "after": _build_tree(na, containers)}
    names = {"before": {n.name for n in nb}, "after": {n.name for n in na}}
    ops_b, ops_a = op_counts(before), op_counts(after)
    removed = sum(n.status == "removed" for n in nb)
    added = sum(n.status == "added" for n in na)
    rewired = sum(n.status == "rewired" for n in na)
    title = title or f"normc diff: {report.get('model') or type(before).__name__}"
    sub = []
    if report.get("rules_file"):
        sub.append(f"rules {_E(report['rules_file'])}")
    sub.append(f"{len(nb)} → {len(na)} nodes (parameters not counted)")
    sub.append(f'<span class="badge removed">−{removed} removed</span><span class="badge added">+{added} added</span>'
               f'<span class="badge rewired">~{rewired} rewired</span>')
    top = [f'<section><h2>ops</h2>{_op_table(ops_b, ops_a)}</section>']
    if report:
        verify = _verify_html(report)
        if verify:
            top.append(f'<section><h2>verification</h2>{verify}</section>')
        top.append(f'<section style="flex:1"><h2>rules</h2>{_rules_html(report, names)}</section>')
    cols = "".join(
        f'<div class="col" id="col-{side}"><h2>{side}</h2>{_render_group(trees[side], side, 0)}</div>'
        for side in SIDES)
    meta = json.dumps({"removed": removed, "added": added, "rewired": rewired,
                       "nodes_before": len(nb), "nodes_after": len(na)})
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/><title>{_E(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>{_E(title)}</h1><div class=\"muted\">{' · '.join(sub)}</div></header><main>"
        f"<div class=\"top\">{''.join(top)}</div>"
        "<div class=\"controls\"><button id=\"expand\" type=\"button\">expand all</button>"
        "<button id=\"collapse\" type=\"button\">collapse all</button>"
        "<button id=\"changed\" type=\"button\">only changed groups</button>"
        "<input id=\"find\" type=\"search\" placeholder=\"find node or op, Enter\"/><span id=\"hits\" class=\"muted\"></span>"
        "<span class=\"legend\"><span><i class=\"sw\" style=\"background:#ffeef0;border-color:#d73a49\"></i>removed</span>"
        "<span><i class=\"sw\" style=\"background:#e6ffed;border-color:#22863a\"></i>added</span>"
        "<span><i class=\"sw\" style=\"background:#fff8c5;border-color:#b08800\"></i>inputs or parameters changed</span>"
        "<span class=\"muted\">click a node to find it on the other side; hover for details</span></span></div>"
        f"<div class=\"graphs\">{cols}</div></main>"
        f"<script type=\"application/json\" id=\"normc-diff-summary\">{meta}</script>"
        f"<script>{_JS}</script></body></html>\n"
    )


def render_diff_html(before: fx.GraphModule, after: fx.GraphModule, report: dict | None, path) -> None:
    """Write the before/after page for two canonical graphs (and the run's report, if any) to `path`.

    `before` must be the graph as it was before the rewrite (a `copy.deepcopy` of it, or
    `prepare_graph(loaded)` again: tracing is deterministic, so node names match).
    """
    text = diff_html(before, after, report)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def render_result_diff(result, path) -> None:
    """Write the page for a `CompileResult`: the "before" graph is re-traced from `result.loaded`."""
    from ..pipeline.runner import prepare_graph
    before, _ = prepare_graph(result.loaded)
    render_diff_html(before, result.graph_module, result.report, path)
