"""``ringtune audit``: the curious middle device's view of a run's configuration, simulated on the owner."""
