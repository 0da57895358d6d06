"""The before/after HTML diff: well-formed, self-contained, BN nodes marked, scales to ~300 nodes."""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
import torch
import torch.fx as fx
from torch import nn

from normc import api
from normc.frontend.specs import InputSpec, LoadedModel
from normc.grammar.loader import load_std
from normc.ir.rewrite import apply_rule
from normc.pipeline import prepare_graph
from normc.report.diff_html import diff_html, render_diff_html, render_result_diff

SVG_NS = "{http://www.w3.org/2000/svg}"
VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(Block(4), Block(4))
        self.head = nn.Linear(4, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.bias.normal_()
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        return self.head(self.blocks(x).mean(dim=(2, 3)))


def _loaded():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    return LoadedModel(Net().eval(), (x,), {}, [InputSpec.from_example("x", x)], "Net", False)


@pytest.fixture(scope="module")
def folded():
    """(before, after, rule report) for std.fold_bn_conv on a canonical graph."""
    before, _ = prepare_graph(_loaded())
    after = copy.deepcopy(before)
    rep = apply_rule(after, load_std().rules["std.fold_bn_conv"])
    assert rep.applied == 3
    return before, after, rep


@pytest.fixture(scope="module")
def result():
    return api.check(api.load_rules(text="pipeline {\n  apply std.bn\n  verify rel 1e-5\n}\n"), _loaded(),
                     verify_inputs=1)


class _Checker(HTMLParser):
    """Collects tags, classes and ids, and checks that non-void tags are balanced."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tags, self.ids = [], [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            if a["id"] in self.ids:
                self.errors.append(f"duplicate id {a['id']}")
            self.ids.add(a["id"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if "id" in dict(attrs):
            self.ids.add(dict(attrs)["id"])

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def _check_html(text):
    p = _Checker()
    p.feed(text)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, p.stack
    return p


def _svgs(text):
    blocks = re.findall(r"<svg\b.*?</svg>", text, flags=re.S)
    assert blocks
    return [ET.fromstring(b) for b in blocks]  # each SVG is well-formed XML on its own


def _nodes(svgs, side):
    out = {}
    for svg in svgs:
        for g in svg.iter(f"{SVG_NS}g"):
            if g.get("id", "").startswith(side + "-"):
                out[g.get("data-key")] = (g.get("data-op"), set(g.get("class").split()))
    return out


def test_bn_fold_marks_removed_and_added_nodes(folded, tmp_path):
    before, after, rep = folded
    path = tmp_path / "out" / "diff.html"
    render_diff_html(before, after, {"rules": [rep.to_dict()]}, path)
    text = path.read_text(encoding="utf-8")
    _check_html(text)
    svgs = _svgs(text)
    b, a = _nodes(svgs, "before"), _nodes(svgs, "after")
    bns = {k for k, (op, _) in b.items() if op == "batch_norm"}
    assert len(bns) == 3
    assert all("removed" in b[k][1] for k in bns)                  # every BN is gone
    assert not any(op == "batch_norm" for op, _ in a.values())     # and none is left
    assert sum("added" in cls for op, cls in a.values() if op == "conv") == 3  # three new convs
    assert all(cls == {"node", "same"} for k, (op, cls) in b.items() if op == "linear")
    assert "rewired" in {c for _, cls in a.values() for c in cls}   # relus now read the new convs
    # parameters are not drawn as nodes but listed on their users
    assert not any(k.endswith("_weight") for k in b)
    assert "param: blocks.0.conv.weight" in text or "param: blocks_0_conv_weight" in text


def test_groups_follow_module_paths(folded):
    before, after, rep = folded
    text = diff_html(before, after, None)
    p = _check_html(text)
    groups = [a.get("data-path") for t, a in p.tags if t == "details" and "grp" in a.get("class", "")]
    # one box per block, on each side; `blocks` itself holds the two
    assert groups.count("blocks") == 2 and groups.count("blocks.0") == 2 and groups.count("blocks.1") == 2
    assert 'class="grp changed"' in text


def test_report_sections(result, tmp_path):
    path = tmp_path / "diff.html"
    render_result_diff(result, path)
    text = path.read_text(encoding="utf-8")
    p = _check_html(text)
    # op table: batch_norm 3 -> 0
    assert re.search(r"<td>batch_norm</td><td class=\"n\">3</td><td class=\"n\">0</td><td class=\"n\">-3</td>", text)
    # per-rule sites link to the removed node in "before"
    links = [a["href"] for t, a in p.tags if t == "a" and "site" in a.get("class", "")]
    assert "#before-batch_norm" in links and len(links) == 3
    assert all(h[1:] in p.ids for h in links)
    assert "std.fold_bn_conv" in text and "verified" in text
    summary = json.loads(re.search(r'id="normc-diff-summary">(.*?)</script>', text).group(1))
    assert summary["removed"] >= 3 and summary["added"] >= 3


def test_self_contained(folded):
    text = diff_html(*folded[:2], None)
    assert "<link" not in text and "@import" not in text and " src=" not in text
    urls = set(re.findall(r"https?://[^\s\"')]+", text))
    assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace only, never fetched


def test_escapes_names():
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.relu, (x,))
    y.meta["normc_path"] = "a<b>&\"c"
    g.output(y)
    gm = fx.GraphModule(nn.Module(), g)
    text = diff_html(gm, gm, {"model": "<script>alert(1)</script>", "rules": []})
    assert "<script>alert(1)" not in text
    _check_html(text)
    _svgs(text)


def _resnet20_graphs():
    """A 20-block ResNet-style net, BNs removed by hand (fast: plain symbolic_trace, no normc passes).

    ~140 drawn nodes; its canonical graph (with the ~160 parameter nodes the page folds into
    their users) has ~300."""
    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
            self.conv2, self.bn2 = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    net = nn.Sequential(*[nn.Sequential(*[B() for _ in range(5)]) for _ in range(4)])
    before = fx.symbolic_trace(net)
    after = copy.deepcopy(before)
    for n in list(after.graph.nodes):
        if n.op == "call_module" and isinstance(after.get_submodule(n.target), nn.BatchNorm2d):
            n.replace_all_uses_with(n.args[0])
            after.graph.erase_node(n)
    after.recompile()
    return before, after


def test_stays_readable_for_a_20_block_resnet(tmp_path):
    before, after = _resnet20_graphs()
    assert len(before.graph.nodes) >= 140
    text = diff_html(before, after, None)
    assert len(text) < 1_500_000
    p = _check_html(text)
    groups = [a for t, a in p.tags if t == "details" and "grp" in a.get("class", "")]
    assert len(groups) == 2 * (4 + 20)  # 4 stages + 20 blocks, each side
    svgs = _svgs(text)
    assert max(int(s.get("height")) for s in svgs) < 24 * 12  # no giant drawing: small per-group runs
    assert max(int(s.get("width")) for s in svgs) < 700
    assert sum("removed" in (g.get("class") or "") for s in svgs for g in s.iter(f"{SVG_NS}g")) == 40
    (tmp_path / "r20.html").write_text(text, encoding="utf-8")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium to render with")
def test_renders_in_headless_chromium(folded, tmp_path):
    before, after, rep = folded
    page = tmp_path / "diff.html"
    render_diff_html(before, after, {"rules": [rep.to_dict()]}, page)
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"]
    dom = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout  # the inline script ran to its end without an error
    shot = tmp_path / "diff.png"
    run = subprocess.run(base + [f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
