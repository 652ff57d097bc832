"""Building blocks shared by the architectures: causal masks, the first / output layers and the residual +
skip stack, and the LSTM gate update."""
