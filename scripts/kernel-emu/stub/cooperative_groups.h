// Host stand-in for <cooperative_groups.h>, for the kernel emulator only:
// the grid group of a cooperative launch (emu.h's emu_launch_cooperative).
#pragma once
namespace cooperative_groups {
struct grid_group {
    void sync() const { emu_grid_sync(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups
