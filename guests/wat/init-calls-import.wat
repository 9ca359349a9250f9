;; Its init function asks WASI for randomness, which Wizer cannot snapshot: the build must be
;; refused with a message naming the import.
(module
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "wizer-initialize")
    (drop (call $random_get (i32.const 0) (i32.const 8))))
  (func (export "_start")))
