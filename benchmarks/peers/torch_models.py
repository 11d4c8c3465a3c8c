"""The workloads' models in PyTorch, for the peers that train torch models (pfl, Flower).

Same shapes as fedjax_sim's zoo and FedJAX's models: `num_params` of each equals
`workloads.Workload.num_params` (checked by the drivers). Each module has `loss(x, y)` (mean
cross-entropy over examples, or over tokens for the LSTM) and `metrics(x, y)`, the methods pfl's
`PyTorchModel` calls.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from workloads import CNN, LSTM, MLP_HIDDEN, pairs


class _Classifier(nn.Module):
    def loss(self, x, y, eval=False):  # noqa: A002 (pfl's keyword)
        self.train(not eval)
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long())

    @torch.no_grad()
    def metrics(self, x, y, eval=True):  # noqa: A002
        from pfl.metrics import Weighted

        n = y.numel()
        return {"loss": Weighted(float(self.loss(x, y, eval=True)) * n, n)}


class Dense(_Classifier):
    def __init__(self, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        dims = [784, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairs(dims))

    def forward(self, x):
        h = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h


class EmnistCNN(_Classifier):
    def __init__(self, num_classes: int):
        super().__init__()
        k = CNN["kernel"]
        self.conv1 = nn.Conv2d(1, CNN["conv1"], k)
        self.conv2 = nn.Conv2d(CNN["conv1"], CNN["conv2"], k)
        self.dense1 = nn.Linear(12 * 12 * CNN["conv2"], CNN["dense"])
        self.dense2 = nn.Linear(CNN["dense"], num_classes)

    def forward(self, x):
        h = x.reshape(x.shape[0], 1, 28, 28)
        h = F.relu(self.conv2(F.relu(self.conv1(h))))
        h = F.dropout(F.max_pool2d(h, 2), 0.25, self.training).flatten(1)
        h = F.dropout(F.relu(self.dense1(h)), 0.5, self.training)
        return self.dense2(h)


class CharLSTM(_Classifier):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, LSTM["embed"])
        self.lstm = nn.LSTM(LSTM["embed"], LSTM["hidden"], LSTM["layers"], batch_first=True)
        self.dense = nn.Linear(LSTM["hidden"], vocab)

    def forward(self, x):
        return self.dense(self.lstm(self.embed(x.long()))[0])


def build(w) -> _Classifier:
    if w.model == "mlp":
        model = Dense((MLP_HIDDEN,), w.num_classes)
    elif w.model == "logistic":
        model = Dense((), w.num_classes)
    elif w.model == "cnn":
        model = EmnistCNN(w.num_classes)
    else:
        model = CharLSTM(w.num_classes)
        # torch's LSTM has two bias vectors per layer (b_ih, b_hh) where the others have one:
        # drop one so that the parameter count, and the update traffic, match.
        for layer in range(LSTM["layers"]):
            bias = getattr(model.lstm, f"bias_hh_l{layer}")
            bias.requires_grad_(False)
            bias.data.zero_()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == w.num_params, (w.name, trainable, w.num_params)
    return model
