"""Graph batches as torch_geometric makes them (issue 29, part 2): a graph classifier
(``model(data)``) and a node classifier (``model(x, edge_index)``) trained briefly the way
PyG's docs show, fed through ``--data file.py:callable`` yielding PyG batches: the batch size
is the number of graphs, labels come from ``y``, accuracy per mode, and ``fix`` works. A dict
that mixes node and edge counts is one clear error, never a slice by the wrong size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pyg = pytest.importorskip("torch_geometric")

import bncheck  # noqa: E402
from bncheck.cli import cli  # noqa: E402

GRAPHS = '''
import torch
from torch import nn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GCNConv, global_mean_pool


def graph(label, seed, shift=0.0):
    """A ring of 6-14 nodes; class 1 has a stronger feature 0 and chords across the ring."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(6, 15, (1,), generator=g))
    ring = torch.arange(n)
    edges = [torch.stack([ring, (ring + 1) % n])]
    if label:
        edges.append(torch.stack([ring, (ring + n // 2) % n]))
    edge_index = torch.cat(edges, 1)
    edge_index = torch.cat([edge_index, edge_index.flip(0)], 1)
    x = torch.randn(n, 8, generator=g)
    x[:, 0] += 1.5 * label
    return Data(x=x * (1 + shift) + shift, edge_index=edge_index, y=torch.tensor([label]))


class GraphNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = GCNConv(8, 32), nn.BatchNorm1d(32)
        self.conv2, self.bn2 = GCNConv(32, 32), nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 2)

    def forward(self, data):
        x = self.bn1(self.conv1(data.x, data.edge_index)).relu()
        x = self.bn2(self.conv2(x, data.edge_index)).relu()
        return self.head(global_mean_pool(x, data.batch))


class NodeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = GCNConv(8, 32), nn.BatchNorm1d(32)
        self.conv2 = GCNConv(32, 2)

    def forward(self, x, edge_index):
        return self.conv2(self.bn1(self.conv1(x, edge_index)).relu(), edge_index)


def node_graph(seed, shift=0.0):
    """Node classification: a node is class 1 when its feature 0 is positive."""
    data = graph(seed % 2, seed, shift)
    data.y = (data.x[:, 0] > shift).long()
    return data


def train(model, graphs, epochs=30):
    loader = DataLoader(graphs, batch_size=16, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            out = model(batch) if isinstance(model, GraphNet) else model(batch.x, batch.edge_index)
            nn.functional.cross_entropy(out, batch.y).backward()
            optimizer.step()
    return model.eval()


def graphs(batch_size=16):
    return DataLoader([graph(i % 2, 1000 + i, SHIFT) for i in range(96)], batch_size=batch_size)


def nodes(batch_size=16):
    return DataLoader([node_graph(2000 + i, SHIFT) for i in range(96)], batch_size=batch_size)


SHIFT = 0.0
'''


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    (root / "graphs.py").write_text(GRAPHS)
    shifted = root / "shifted.py"
    shifted.write_text(GRAPHS.replace("SHIFT = 0.0", "SHIFT = 1.5"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("bncheck_test_graphs", root / "graphs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    graph_net = module.train(module.GraphNet(), [module.graph(i % 2, i) for i in range(192)])
    node_net = module.train(module.NodeNet(), [module.node_graph(i) for i in range(192)], epochs=15)
    torch.save(graph_net.state_dict(), root / "graph.pt")
    torch.save(node_net.state_dict(), root / "node.pt")
    return root, module, graph_net, node_net


def accuracy(model, loader, train_mode: bool, node: bool) -> float:
    import copy

    model = copy.deepcopy(model).train(train_mode)
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            out = model(batch.x, batch.edge_index) if node else model(batch)
            right += int((out.argmax(1) == batch.y).sum())
            total += int(batch.y.numel())
    return right / total


@pytest.mark.parametrize("kind", ["graph", "node"])
def test_pyg_batches_run_with_accuracy_per_mode(zoo, kind: str) -> None:
    root, module, graph_net, node_net = zoo
    model, node = (graph_net, False) if kind == "graph" else (node_net, True)
    for shifted in (False, True):
        module.SHIFT = 1.5 if shifted else 0.0
        loader = module.graphs() if kind == "graph" else module.nodes()
        report = bncheck.analyze(model, loader, batch_size=16)
        out = report.output
        assert report.data.samples == 96 and report.data.batch_size == 16  # graphs, not nodes
        assert out.kind == "classifier" and out.labeled == (96 if not node else sum(b.num_nodes for b in loader))
        assert out.eval_accuracy == pytest.approx(accuracy(model, loader, False, node))
        assert out.train_accuracy == pytest.approx(accuracy(model, loader, True, node))
        if not shifted:
            assert report.verdict == "pass", [(f.code, f.severity, f.message) for f in report.findings]
        else:
            assert report.verdict == "fail" and report.layers[0].name == "bn1"
    module.SHIFT = 0.0


def test_pyg_pipeline_through_the_cli_run_and_fix(zoo) -> None:
    root, module, graph_net, _ = zoo
    spec = f"{root / 'shifted.py'}:graphs"
    arch = ["--arch", f"{root / 'graphs.py'}:GraphNet"]
    run = CliRunner().invoke(cli, ["run", str(root / "graph.pt"), *arch, "--data", spec, "--batch-size", "16",
                                   "--json", "-"])
    assert run.exit_code == 1, run.output
    doc = json.loads(run.stdout)
    assert doc["data"]["samples"] == 64 and doc["output"]["labeled"] == 64  # 4 batches of 16 graphs (the default)
    fixed = root / "graph.fixed.pt"
    result = CliRunner().invoke(cli, ["fix", str(root / "graph.pt"), *arch, "--data", spec, "--batch-size", "16",
                                      "--out", str(fixed)])
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    if fixed.exists():  # a fix that writes never lowers labelled accuracy
        net = module.GraphNet()
        net.load_state_dict(torch.load(fixed))
        module.SHIFT = 1.5
        assert accuracy(net, module.graphs(), False, False) >= accuracy(graph_net, module.graphs(), False, False)
        module.SHIFT = 0.0


def test_a_dict_of_node_and_edge_tensors_is_one_clear_error(zoo) -> None:
    """The workaround users try first: {"inputs": {x, edge_index, batch}, "labels": y}."""
    root, module, _, _ = zoo

    class DictNet(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, edge_index, batch):
            return self.net(type("G", (), {"x": x, "edge_index": edge_index, "batch": batch})())

    batches = [{"inputs": {"x": b.x, "edge_index": b.edge_index, "batch": b.batch}, "labels": b.y}
               for b in module.graphs()]
    with pytest.raises(bncheck.InputError, match=r"different leading sizes \(batch: \d+, edge_index: 2, x: \d+\)"):
        bncheck.analyze(DictNet(module.GraphNet()), batches, batch_size=16)


def test_a_single_graph_is_one_sample_and_is_not_re_dealt(zoo) -> None:
    _, module, _, node_net = zoo
    data = [module.node_graph(i, 1.5) for i in range(4)]  # Data objects, not Batch: one graph each
    report = bncheck.analyze(node_net, data, batch_size=2)
    assert report.data.samples == 4 and report.output.kind == "classifier"
    assert Path(module.__file__).name == "graphs.py"
