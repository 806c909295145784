"""Readers: study reports, their sections and figures, explain.md. Nothing here trains or samples: it reads files a run or sweep wrote."""
