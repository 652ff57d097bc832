"""What the LSTM layers of *Pixel Recurrent Neural Networks* (van den Oord et al., 2016) share: the gate
update at one pixel, used by the Row LSTM's and the Diagonal BiLSTM's cached samplers."""

import torch


class LSTMGatesAtPixel:
    """Gate buffer of an LSTM at one pixel, and the LSTM update from it (cached sampling).

    ``values`` (..., 4h) holds the gate pre-activations, laid out [i, f, o, g] like the layers' gates;
    ``update`` turns them into c = f . c_before + i . g and h = o . tanh(c), written into the given
    views, as ``RowLSTMLayer.step`` and ``DiagonalBiLSTMLayer.step`` compute them. Six in-place ops and
    no allocation: the buffer is reused as scratch space, so its values are gone after ``update``.
    """

    def __init__(self, like: torch.Tensor, *shape: int, hidden: int):
        self.values = like.new_zeros(*shape, 4 * hidden)
        self.sigmoid_part = self.values[..., : 3 * hidden]  # i, f, o
        self.input, self.forget, self.output, self.candidate = self.values.split(hidden, -1)

    def update(self, cell_before: torch.Tensor, cell: torch.Tensor, hidden: torch.Tensor) -> None:
        self.sigmoid_part.sigmoid_()
        self.candidate.tanh_()
        torch.mul(self.forget, cell_before, out=cell)
        cell.addcmul_(self.input, self.candidate)
        torch.mul(self.output, torch.tanh(cell, out=self.candidate), out=hidden)
