"""Docker-backed container runtime shim: sandboxes, containers, images."""
