"""The engine that runs the ranks: Horovod start-up, the world the ranks agree on, the device and the
mixed precision a rank computes in."""
