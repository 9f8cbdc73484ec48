"""Whisper's encoder as LatentSync uses it: transformers' ``WhisperEncoder`` giving, per 20 ms row, the stack of
the embeddings and every block's output (without the final layer norm), over independent 30 s log-mel windows.

The log-mel comes from ``latentsync.audio``; the checkpoint formats are read by ``latentsync.weights``
(``load_whisper``), which builds this module's ``AudioEncoder``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from latentsync.audio import N_FRAMES
from latentsync.devices import upload


class AudioEncoder(torch.nn.Module):
    """Whisper's encoder (transformers) giving LatentSync's per-row stack of hidden states."""

    def __init__(self, encoder: WhisperEncoder):
        super().__init__()
        if encoder.config.max_source_positions * 2 != N_FRAMES:
            raise ValueError(f"a Whisper encoder with {N_FRAMES // 2} positions is needed, "
                             f"got {encoder.config.max_source_positions}")
        self.encoder = encoder.eval()

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype

    @property
    def num_states(self) -> int:
        """Hidden states per row: the embeddings and each block's output."""
        return len(self.encoder.layers) + 1

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.d_model

    @torch.inference_mode()
    def encode_window(self, mel: torch.Tensor) -> torch.Tensor:
        """Hidden states of one ``(80, 3000)`` log-mel window: ``(1500, num_states, hidden_size)`` float32 on CPU."""
        captured = {}

        def keep_output(module, args, output):
            captured["last"] = output[0] if isinstance(output, tuple) else output

        # transformers' last hidden state has the final layer norm applied; upstream takes the block's own output
        handle = self.encoder.layers[-1].register_forward_hook(keep_output)
        try:
            hidden = self.encoder(upload(mel, self.device).to(self.dtype)[None], output_hidden_states=True,
                                  return_dict=True).hidden_states
        finally:
            handle.remove()
        return torch.stack([*hidden[:-1], captured["last"]], dim=2)[0].float().cpu()

    @torch.inference_mode()
    def features_from_log_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """Encoder features of a whole file's ``log_mel``: ``(M // 2, num_states, hidden_size)`` float32 on CPU."""
        n_mel = mel.shape[1]
        windows = [(s, min(s + N_FRAMES, n_mel)) for s in range(0, n_mel, N_FRAMES)]
        rows = [(stop - start) // 2 for start, stop in windows]  # a window keeps only the rows of real audio
        out = torch.empty(sum(rows), self.num_states, self.hidden_size)
        row = 0
        for (start, stop), keep in zip(windows, rows, strict=True):
            if keep == 0:
                continue
            # Windows are encoded independently, right-padded with 0.0 in normalised log-mel (upstream pad_or_trim).
            window = F.pad(mel[:, start:stop], (0, N_FRAMES - (stop - start)))
            out[row : row + keep] = self.encode_window(window)[:keep]
            row += keep
        return out
