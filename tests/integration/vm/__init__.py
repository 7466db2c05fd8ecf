"""Harness for tests that boot a real Linux guest under QEMU (TCG) attached to guestnet.

initramfs.py builds the guest's root filesystem, qemu.py runs guestnet and QEMU and reads the serial
console, fixtures.py has the pytest fixtures (import them into the test module).
"""
