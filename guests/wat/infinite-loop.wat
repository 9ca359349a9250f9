;; Spins forever: the daemon must cut it off at its epoch deadline.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever (br $forever))))
