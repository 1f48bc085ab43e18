// Host stand-in for <mma.h>, for the kernel emulator only: nvcuda::wmma is
// emulated in emu.h (section "WMMA"), which every harness includes first.
#pragma once
