"""What a render leaves on disk and how it stops: atomic writes and read-back (writes), the mp4
encoder (video), step checkpoints (checkpoint), stop requests every rank agrees on (stop), and
the fault injector the chaos tests drive (faults)."""
