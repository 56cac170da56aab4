"""One multiplexed, full-duplex connection over a stream: sequence ids, pending calls,
flushing, deadlines, heartbeats; and the asyncio runtime it runs on."""
