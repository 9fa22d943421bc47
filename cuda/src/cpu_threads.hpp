// cpu_threads.hpp -- whether the CPU kernels' OpenMP regions may use more than one thread.
#pragma once

namespace escoin {

// False in a process forked after the library was loaded. GNU OpenMP's thread pool does not
// survive fork(): a child's first parallel region after its parent ran one waits for pool
// threads that were not copied, and hangs. A forked child's regions therefore run on its one
// thread (their `if` clause), correctly but serially: multiprocessing's default start method on
// Linux, DataLoader and server workers fork.
bool cpu_threads_usable();

}  // namespace escoin
