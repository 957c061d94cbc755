// torch_lamb's gradient scan: every parameter's .grad checked and its data pointer read in one C++ pass.
//
// The CPU kernel reads gradients as raw arrays, so before each step the optimizer must know that every
// gradient is a packed CPU tensor of its parameter's shape and dtype, and that every parameter still has the
// storage, element count and dtype its cached layout was built with. In Python that is five attribute
// passes over the list (about 1.5 us per tensor once the kernel has evicted their metadata from cache);
// here it is one pass that never creates a Python object for a gradient.
//
// scan(params, expected_pointers, expected_shapes, expected_dtypes, out) -> int
//   params: the list of parameter tensors, in layout order (the caller checked that they are the layout's);
//   expected_*: addresses of an int64 array (a data pointer per parameter), an int64 array (per parameter, its
//   number of dims, then its dims) and an int8 array (a c10::ScalarType per parameter);
//   out: address of an int64 array that receives each gradient's data pointer.
// Returns -1 when every parameter passed, else the index of the first one that did not (the caller then
// takes its ordinary path, which reads and checks every gradient itself). Nothing is written but `out`.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

namespace {

// `shape`: the parameter's expected dims, after their count.
bool usable(const at::Tensor& p, const at::Tensor& g, int64_t pointer, const int64_t* shape, int8_t dtype) {
  if (!g.defined() || g.layout() != c10::kStrided || p.layout() != c10::kStrided) return false;
  if (g.key_set().has(c10::DispatchKey::Python) || p.key_set().has(c10::DispatchKey::Python)) return false;
  if (!g.is_cpu() || !p.is_cpu() || g.is_neg() || g.is_conj() || p.is_neg() || p.is_conj()) return false;
  if (static_cast<int8_t>(p.scalar_type()) != dtype || g.scalar_type() != p.scalar_type()) return false;
  if (!p.sizes().equals(c10::IntArrayRef(shape + 1, static_cast<size_t>(shape[0]))) || !g.sizes().equals(p.sizes()))
    return false;
  if (!p.is_contiguous() || !g.is_contiguous()) return false;
  return reinterpret_cast<int64_t>(p.data_ptr()) == pointer;
}

const c10::TensorImpl* impl_of(PyObject* params, Py_ssize_t i) {
  return THPVariable_Unpack(PyList_GET_ITEM(params, i)).unsafeGetTensorImpl();
}

const c10::TensorImpl* grad_impl(const c10::TensorImpl* p) {
  const c10::AutogradMetaInterface* meta = p->autograd_meta();
  return meta != nullptr ? meta->grad().unsafeGetTensorImpl() : nullptr;
}

void prefetch_object(const void* address) {  // a TensorImpl spans a few cache lines
  __builtin_prefetch(address);
  __builtin_prefetch(static_cast<const char*>(address) + 64);
  __builtin_prefetch(static_cast<const char*>(address) + 128);
}

// Each tensor's metadata is a chain of objects (the Python object, its TensorImpl, the storage, the autograd
// meta, the gradient's TensorImpl and storage) that the kernel's streaming has evicted from cache. Walking the
// chain one tensor at a time waits for each miss in turn; here tensor i + k * kAhead has link k fetched while
// tensor i is checked, so the misses of several tensors are in flight together.
constexpr Py_ssize_t kAhead = 4;

void prefetch_links(PyObject* params, Py_ssize_t i, Py_ssize_t n) {
  if (i + 5 * kAhead < n) __builtin_prefetch(PyList_GET_ITEM(params, i + 5 * kAhead));
  if (i + 4 * kAhead < n) prefetch_object(impl_of(params, i + 4 * kAhead));
  if (i + 3 * kAhead < n) {
    const c10::TensorImpl* p = impl_of(params, i + 3 * kAhead);
    __builtin_prefetch(p->autograd_meta());
    __builtin_prefetch(p->storage().unsafeGetStorageImpl());
  }
  if (i + 2 * kAhead < n) {
    if (const c10::TensorImpl* g = grad_impl(impl_of(params, i + 2 * kAhead))) prefetch_object(g);
  }
  if (i + kAhead < n) {
    const c10::TensorImpl* g = grad_impl(impl_of(params, i + kAhead));
    if (g != nullptr && g->has_storage()) __builtin_prefetch(g->storage().unsafeGetStorageImpl());
  }
}

// `params` must hold only tensors: the caller passes its own list, whose items' types it checked when it built it.
PyObject* scan(PyObject*, PyObject* args) {
  PyObject* params;
  unsigned long long pointers, shapes, dtypes, out;
  if (!PyArg_ParseTuple(args, "O!KKKK", &PyList_Type, &params, &pointers, &shapes, &dtypes, &out)) return nullptr;
  const auto* expected_pointer = reinterpret_cast<const int64_t*>(pointers);
  const auto* expected_shape = reinterpret_cast<const int64_t*>(shapes);
  const auto* expected_dtype = reinterpret_cast<const int8_t*>(dtypes);
  auto* grad_pointer = reinterpret_cast<int64_t*>(out);
  const Py_ssize_t n = PyList_GET_SIZE(params);
  for (Py_ssize_t i = 0; i < n; ++i) {
    try {
      prefetch_links(params, i, n);
      const at::Tensor& p = THPVariable_Unpack(PyList_GET_ITEM(params, i));
      const at::Tensor& g = p.grad();
      if (!usable(p, g, expected_pointer[i], expected_shape, expected_dtype[i])) return PyLong_FromSsize_t(i);
      expected_shape += 1 + expected_shape[0];
      grad_pointer[i] = reinterpret_cast<int64_t>(g.data_ptr());
    } catch (...) {  // anything unusual (a tensor that refuses a query) is the ordinary path's to judge
      return PyLong_FromSsize_t(i);
    }
  }
  return PyLong_FromLong(-1);
}

PyObject* abi(PyObject*, PyObject*) { return PyLong_FromLong(1); }

PyObject* dtype_code(PyObject*, PyObject* arg) {  // the code `scan` compares a parameter's dtype with
  if (!THPVariable_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "dtype_code: expected a tensor");
    return nullptr;
  }
  return PyLong_FromLong(static_cast<long>(THPVariable_Unpack(arg).scalar_type()));
}

PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Check every parameter's gradient and read its data pointer (-1: all passed)."},
    {"abi", abi, METH_NOARGS, "The calling convention's version."},
    {"dtype_code", dtype_code, METH_O, "A tensor's dtype as the code `scan` compares (c10::ScalarType)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_grad_scan", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__grad_scan(void) { return PyModule_Create(&module); }
